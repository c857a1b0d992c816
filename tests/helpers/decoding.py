"""Decoding a sequence through a model's KV cache, for tests that compare it with the
teacher-forced forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def cached_logits(model: nnx.Module, ids: jax.Array, prefill: int) -> jax.Array:
    """Logits ``(B, T, vocab)`` of ``ids`` ``(B, T)`` decoded through ``model``'s cache:
    a prefill of the first ``prefill`` tokens, then one token at a time (jitted)."""
    step = nnx.jit(lambda m, x, c, p: m.forward_cached(x, c, p))
    logits, cache = step(model, ids[:, :prefill], model.init_cache(ids.shape[0]),
                         jnp.int32(0))
    pieces = [logits]
    for pos in range(prefill, ids.shape[1]):
        logits, cache = step(model, ids[:, pos:pos + 1], cache, jnp.int32(pos))
        pieces.append(logits)
    return jnp.concatenate(pieces, axis=1)
