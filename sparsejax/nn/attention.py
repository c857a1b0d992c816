"""The attention core as a configurable layer: what an attention module computes from its
queries, keys and values.

:class:`Attention` is the base of a model's attention modules (GPT's
``CausalSelfAttention``): path rules with an ``attention`` block find them by module path
(``blocks/0/attn``) and give them a transform - gain-cell attention, for one - that
replaces the softmax; the projections around it stay ordinary :class:`Linear` layers with
their own rules. Unconfigured, it is causal softmax attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from sparsejax.nn.slots import TransformHost, TransformSlot
from sparsejax.transforms import CachedAttention, Site

__all__ = ["Attention", "tap_attention"]

Tap = Callable[["Attention", jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None],
              None]
# Functions that see every attention call (``tap_attention``); empty in normal use.
_TAPS: list[Tap] = []


@contextlib.contextmanager
def tap_attention(fn: Tap) -> Iterator[None]:
    """Within the block, every :meth:`Attention.attend` passes ``(layer, q, k, v, y, x)``
    to ``fn`` (at trace time under ``jax.jit``; ``x`` the module's input, or None):
    statistics for calibration (``sparsejax.adapt``) without the model knowing."""
    _TAPS.append(fn)
    try:
        yield
    finally:
        _TAPS.remove(fn)


class Attention(TransformHost):
    """Base of attention modules with ``n_head`` heads of ``head_dim``: :meth:`attend` is
    causal softmax attention (scale ``1 / sqrt(head_dim)``) until :meth:`configure` gives
    it an attention transform (a stage the rule blocks declare for ``attention`` layers).
    Subclasses call ``super().__init__`` and compute their projections themselves.

    Grouped-query attention: ``n_kv_head`` (dividing ``n_head``; default ``n_head``) key /
    value heads, each shared by ``n_head / n_kv_head`` query heads; the plain cache holds
    only the key / value heads. An attention transform sees every query head's keys and
    values (the shared heads repeated), so its site stays ``(n_head, head_dim)``."""

    layer_type = "attention"

    def __init__(self, n_head: int, head_dim: int, n_kv_head: int | None = None):
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        self.n_head, self.head_dim, self.n_kv_head = n_head, head_dim, n_kv_head
        self._init_stages()

    def repeat_kv(self, x: jax.Array) -> jax.Array:
        """Keys or values ``(B, L, n_kv_head, D)`` -> ``(B, L, n_head, D)``, each shared head
        repeated for its group of query heads (query head ``h`` reads kv head
        ``h // (n_head / n_kv_head)``)."""
        groups = self.n_head // self.n_kv_head
        return x if groups == 1 else jnp.repeat(x, groups, axis=2)

    def site(self, stage: str = "attention") -> Site:
        return Site("attention", (self.n_head, self.head_dim))

    @property
    def attention_slot(self) -> TransformSlot | None:
        """The configured attention transform, or None (softmax)."""
        return next((slot for _, slot in self.slots()), None)

    def kv_projection(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(W_k, b_k, W_v, b_v)``: the inference weights ``(in, H * D)`` and biases
        ``(H * D,)`` that map the module's input to its keys and values (for transforms
        that re-project them, e.g. CSKV). Subclasses with such projections define it."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its key and "
                                  "value projections")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
               q_positions: jax.Array | None = None, x: jax.Array | None = None
               ) -> jax.Array:
        """``q`` ``(B, T, H, D)``, ``k``, ``v`` ``(B, L, K, D)`` (``K = n_kv_head``) at key
        positions ``0 .. L-1`` -> ``(B, T, H, D)``. ``q_positions`` ``(T,)``: the queries' positions
        (default ``0 .. T-1`` with ``L == T``, the training forward); each query sees the
        keys at or before its position (a KV cache's unwritten tail is thus hidden).
        ``x`` ``(B, L, C)``: the module's input that produced ``k``, ``v`` (for transforms
        that re-project it)."""
        if self.attention_slot is not None:  # methods see every query head's keys / values
            k, v = self.repeat_kv(k), self.repeat_kv(v)
        if self.attention_slot is None:
            if q_positions is None:
                y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            else:
                visible = jnp.arange(k.shape[1])[None, :] <= q_positions[:, None]
                y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                                 mask=visible[None, None])
        else:
            positions = jnp.arange(q.shape[1]) if q_positions is None else q_positions
            ctx = self.context()
            y = self.attention_slot.attend(q, k, v, positions, ctx, x)
        for tap in _TAPS:
            tap(self, q, k, v, y, x)
        return y

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype = jnp.float32
                   ) -> dict[str, jax.Array]:
        """An empty decoding cache of ``length`` positions: ``{"k", "v"}`` of shape
        ``(batch, length, n_kv_head, D)``, or the layout of the attention transform when it
        keeps its own (a compressed cache)."""
        if self.attention_slot is not None and isinstance(self.attention_slot.spec,
                                                            CachedAttention):
            return self.attention_slot.spec.init_cache(self.site(), batch, length, dtype)
        shape = (batch, length, self.n_kv_head, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array,
                      cache: dict[str, jax.Array], pos: jax.Array
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Decoding: ``q`` ``(B, T, H, D)``, ``k``, ``v`` ``(B, T, K, D)`` and the input
        ``x`` ``(B, T, C)``
        of the tokens at ``pos .. pos + T - 1``; they are written into ``cache`` and each
        query attends to the cached positions up to its own. Returns the output and the
        cache; the same numbers as :meth:`attend` on the whole sequence."""
        if self.attention_slot is not None and isinstance(self.attention_slot.spec,
                                                            CachedAttention):
            ctx = self.context()
            return self.attention_slot.attend_cached(q, self.repeat_kv(k), self.repeat_kv(v),
                                                     x, cache, pos, ctx)
        start = (0, pos, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
        values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        y = self.attend(q, keys, values, pos + jnp.arange(q.shape[1]))
        return y, {"k": keys, "v": values}
