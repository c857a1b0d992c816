"""What attention methods that keep the softmax share: causal softmax attention with the
two products ``q k^T`` and ``p v`` computed by a given function."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["softmax_attention"]

Product = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                      product: Product) -> jax.Array:
    """Causal softmax attention, ``q`` ``(B, T, H, D)`` at ``q_positions`` ``(T,)`` over
    ``k``, ``v`` ``(B, L, H, D)`` at ``0 .. L-1``, with ``product(a, b)`` for the batched
    matrix products ``(B, H, T, D) x (B, H, D, L)`` and ``(B, H, T, L) x (B, H, L, D)``
    (float32 softmax). Returns ``(B, T, H, D)`` in ``q``'s dtype."""
    qh, kh, vh = (jnp.swapaxes(t.astype(jnp.float32), 1, 2) for t in (q, k, v))
    scores = product(qh, jnp.swapaxes(kh, -1, -2)) / jnp.sqrt(jnp.float32(q.shape[-1]))
    visible = jnp.arange(k.shape[1])[None, :] <= q_positions[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.swapaxes(product(probs, vh), 1, 2).astype(q.dtype)
