"""L-Mul attention: softmax attention whose two products ``q k^T`` and ``p v`` multiply
by integer addition (Luo & Sun, arXiv 2410.00907; ``sparsejax.numerics.lmul``) and
accumulate in float32, with straight-through gradients (those of the exact products).
Simulation: every product is emulated with integer operations, far slower than a matmul."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.estimators import straight_through
from sparsejax.numerics.lmul import lmul_matmul
from sparsejax.transforms.attention.common import softmax_attention
from sparsejax.transforms.base import Context, Metrics, Site, SpecError, State, Transform, register

__all__ = ["LMulAttention"]


@register("attention", "lmul")
@dataclass(frozen=True, kw_only=True)
class LMulAttention(Transform):
    """``mantissa_bits``: the operands' mantissa width (the paper's 3 or 4 bits for
    FP8-class precision); ``k_tile``: products formed at once along the contracted axis
    (memory: ``(B, H, T, k_tile, L)`` floats)."""

    mantissa_bits: int = 4
    k_tile: int = 16

    roles = ("attention",)

    def check(self) -> None:
        if not 1 <= self.mantissa_bits <= 23:
            raise SpecError("mantissa_bits", f"mantissa_bits must be in [1, 23], got "
                            f"{self.mantissa_bits}")
        if self.k_tile < 1:
            raise SpecError("k_tile", f"k_tile must be at least 1, got {self.k_tile}")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               params: State, state: State, site: Site, ctx: Context,
               x: jax.Array | None = None) -> tuple[jax.Array, State, Metrics]:
        def product(a: jax.Array, b: jax.Array) -> jax.Array:
            return straight_through(jnp.matmul(a, b),
                                    lmul_matmul(a, b, self.mantissa_bits, self.k_tile))

        return softmax_attention(q, k, v, q_positions, product), state, {}
