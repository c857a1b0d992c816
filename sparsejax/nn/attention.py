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
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.nn.slots import TransformSlot
from sparsejax.transforms import Context, Site, Transform

__all__ = ["ATTENTION_STAGES", "Attention", "tap_attention"]

ATTENTION_STAGES = ("attention",)

# Functions that see every attention call (``tap_attention``); empty in normal use.
_TAPS: list[Callable[[Attention, jax.Array, jax.Array, jax.Array, jax.Array], None]] = []


@contextlib.contextmanager
def tap_attention(fn: Callable[[Attention, jax.Array, jax.Array, jax.Array, jax.Array], None]
                  ) -> Iterator[None]:
    """Within the block, every :meth:`Attention.attend` passes ``(layer, q, k, v, y)`` to
    ``fn`` (at trace time under ``jax.jit``): statistics for calibration
    (``sparsejax.adapt``) without the model knowing."""
    _TAPS.append(fn)
    try:
        yield
    finally:
        _TAPS.remove(fn)


class Attention(nnx.Module):
    """Base of attention modules with ``n_head`` heads of ``head_dim``: :meth:`attend` is
    causal softmax attention (scale ``1 / sqrt(head_dim)``) until :meth:`configure` gives
    it an ``attention`` transform. Subclasses call ``super().__init__`` and compute their
    projections themselves."""

    def __init__(self, n_head: int, head_dim: int):
        self.n_head, self.head_dim = n_head, head_dim
        self.attention: TransformSlot | None = nnx.data(None)
        self.seed = 0
        self.deterministic = False

    def configure(self, specs: Mapping[str, Transform], seed: int = 0) -> None:
        """``{"attention": spec}`` (or ``{}`` to restore softmax); ``seed`` keys draws."""
        unknown = set(specs) - set(ATTENTION_STAGES)
        if unknown:
            raise ValueError(f"an attention module takes only an attention transform, got "
                             f"{sorted(unknown)}")
        self.seed = seed
        spec = specs.get("attention")
        self.attention = None if spec is None else TransformSlot(
            spec, self.site("attention"), None, seed)

    def site(self, stage: str = "attention") -> Site:
        return Site("attention", (self.n_head, self.head_dim))

    def slots(self) -> list[tuple[str, TransformSlot]]:
        return [] if self.attention is None else [("attention", self.attention)]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
               q_positions: jax.Array | None = None) -> jax.Array:
        """``q`` ``(B, T, H, D)``, ``k``, ``v`` ``(B, L, H, D)`` at key positions
        ``0 .. L-1`` -> ``(B, T, H, D)``. ``q_positions`` ``(T,)``: the queries' positions
        (default ``0 .. T-1`` with ``L == T``, the training forward); each query sees the
        keys at or before its position (a KV cache's unwritten tail is thus hidden)."""
        if self.attention is None:
            if q_positions is None:
                y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            else:
                visible = jnp.arange(k.shape[1])[None, :] <= q_positions[:, None]
                y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                                 mask=visible[None, None])
        else:
            positions = jnp.arange(q.shape[1]) if q_positions is None else q_positions
            ctx = Context(not self.deterministic, jax.random.key(self.seed))
            y = self.attention.attend(q, k, v, positions, ctx)
        for tap in _TAPS:
            tap(self, q, k, v, y)
        return y
