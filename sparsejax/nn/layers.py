"""Basic layers: :class:`Linear`, :class:`Embed`, :class:`LayerNorm` and functional dropout.

Parameters are stored in float32; ``dtype`` is the compute dtype (float32 or bfloat16):
operands are cast to it before the matmul and the result is returned in it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.sparse_linear import nm_linear
from sparsejax.sparsity import NMSpec, check_nm, effective_weight, sste_scale

__all__ = ["Embed", "LayerNorm", "Linear", "SparsityState", "dropout"]


class SparsityState(nnx.Variable):
    """Non-trainable state of a sparse layer (S-STE's frozen beta, the MVUE draw counter):
    saved in checkpoints with the rest of the model, never touched by the optimiser."""

Initializer = nnx.initializers.Initializer
DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
DEFAULT_EMBED_INIT = nnx.initializers.normal(0.02)


class Linear(nnx.Module):
    """``y = x @ W + b`` with ``W`` of shape ``(in_features, out_features)``.

    Axis 0 of ``W`` is the contracting axis: N:M groups and quantisation blocks run along
    it (see ``../shared/docs/METHODS.md``, conventions). A layer is dense until
    :meth:`set_sparsity` (called by path rules, ``sparsejax.nn.apply_rules``) gives it an
    :class:`~sparsejax.sparsity.NMSpec`; it then multiplies by the method's effective
    weight through :func:`~sparsejax.sparse_linear.nm_linear`.

    Args:
      in_features, out_features: sizes of the last axis of ``x`` and of ``y``.
      use_bias: add a learned bias.
      kernel_init: initialiser of ``W``.
      dtype: compute dtype; ``None`` keeps the input's dtype.
      rngs: the ``nnx.Rngs`` that draws the initial weights.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT,
                 dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.sparsity: NMSpec | None = None
        self.beta: SparsityState | None = nnx.data(None)
        self.mvue_count: SparsityState | None = nnx.data(None)
        self.mvue_seed = 0

    def set_sparsity(self, spec: NMSpec, seed: int = 0) -> None:
        """Make this layer N:M sparse. S-STE's beta is fitted to the *current* kernel and
        frozen (METHODS.md section 1); ``seed`` keys this layer's MVUE draws."""
        check_nm(self.kernel.shape, spec.n, spec.m, axis=0)
        self.sparsity = spec
        self.beta = (SparsityState(sste_scale(self.kernel[...], spec.n, spec.m, 0))
                     if spec.method == "sste" else None)
        self.mvue_count = SparsityState(jnp.zeros((), jnp.uint32)) if spec.mvue else None
        self.mvue_seed = seed

    def effective_kernel(self) -> jax.Array:
        """The weight the matmul uses, shape ``(in, out)``."""
        w = self.kernel[...]
        if self.sparsity is None:
            return w
        beta = None if self.beta is None else self.beta[...]
        return effective_weight(w, self.sparsity, beta, axis=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``."""
        dtype = self.dtype or x.dtype
        if self.sparsity is None:
            y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        else:
            key = None
            if self.mvue_count is not None:  # a fresh key per call, resumable from state
                count = self.mvue_count[...]
                key = jax.random.fold_in(jax.random.key(self.mvue_seed), count)
                self.mvue_count[...] = count + 1
            y = nm_linear(x.astype(dtype), self.effective_kernel().astype(dtype), key,
                          mvue=self.sparsity.mvue, fp8_sim=self.sparsity.fp8)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """Lookup table ``(num_embeddings, features)``; :meth:`attend` is the tied output head
    ``x @ table.T``."""

    def __init__(self, num_embeddings: int, features: int, *,
                 embedding_init: Initializer = DEFAULT_EMBED_INIT,
                 dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features),
                                                  jnp.float32))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids``: integer ``(...)`` -> ``(..., features)``."""
        out = jnp.take(self.embedding[...], ids, axis=0)
        return out.astype(self.dtype) if self.dtype else out

    def attend(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., features)`` -> logits ``(..., num_embeddings)``."""
        dtype = self.dtype or x.dtype
        return jnp.matmul(x.astype(dtype), self.embedding[...].astype(dtype).T)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32, output in ``dtype``."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype: jnp.dtype | None = None):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype or x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (evaluation) or ``rate == 0``."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
