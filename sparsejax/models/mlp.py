"""MLP classifier: features ``(B, F)`` -> class logits ``(B, num_classes)``.

Linear paths for rules: ``layers/<i>`` for the hidden layers, ``head`` for the output;
activation paths (analog activation noise): ``acts/<i>``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.family import Family, ModelField, register_family
from sparsejax.nn import Activation, Linear, dropout, shard_batch

__all__ = ["MLPClassifier"]


class MLPClassifier(nnx.Module):
    def __init__(self, in_features: int, hidden: list[int] | tuple[int, ...], num_classes: int,
                 *, dropout_rate: float = 0.0, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        sizes = [in_features, *hidden]
        self.dropout_rate = dropout_rate
        self.layers = nnx.List([Linear(a, b, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
        self.acts = nnx.List([Activation("gelu") for _ in hidden])
        self.head = Linear(sizes[-1], num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        for i, (layer, act) in enumerate(zip(self.layers, self.acts, strict=True)):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x = shard_batch(dropout(act(layer(x)), self.dropout_rate, key))
        return self.head(x).astype(jnp.float32)


DIGITS_FEATURES = 64  # the 8x8 images of data.source=digits


def _build(m, dtype, rngs: nnx.Rngs) -> MLPClassifier:
    return MLPClassifier(DIGITS_FEATURES, list(m.hidden), m.num_classes,
                         dropout_rate=m.dropout, dtype=dtype, rngs=rngs)


register_family(Family(
    name="mlp", task="classification", build=_build,
    fields=(ModelField("hidden", list[int], [128, 128], "hidden layer sizes"),
            ModelField("num_classes", int, 10), ModelField("dropout", float, 0.0)),
    doc="MLP classifier of the 8x8 digits"))
