"""L-Mul attention: softmax attention whose two products ``q k^T`` and ``p v`` multiply
by integer addition (Luo & Sun, arXiv 2410.00907; ``sparsejax.numerics.lmul``) and
accumulate in float32, with straight-through gradients (those of the exact products).
Simulation: every product is emulated with integer operations, far slower than a matmul."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.transforms.attention.common import softmax_attention
from sparsejax.transforms.base import (
    AttentionMethod,
    Context,
    Metrics,
    Site,
    State,
    Transform,
    register,
)
from sparsejax.transforms.quant.lmul import LMulArithmetic

__all__ = ["LMulAttention"]


@register("attention", "lmul")
@dataclass(frozen=True, kw_only=True)
class LMulAttention(LMulArithmetic, AttentionMethod, Transform):
    """Both attention products by L-Mul (:class:`LMulArithmetic`: ``mantissa_bits``, the
    paper's 3 or 4 for FP8-class precision, and ``k_tile``)."""

    roles = ("attention",)

    def check(self) -> None:
        LMulArithmetic.check(self)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               params: State, state: State, site: Site, ctx: Context,
               x: jax.Array | None = None) -> tuple[jax.Array, State, Metrics]:
        return softmax_attention(q, k, v, q_positions, self.product), state, {}
