"""L-Mul linear layers: the layer's matmul with every product an L-Mul (multiplication by
integer addition, Luo & Sun, arXiv 2410.00907; ``sparsejax.numerics.lmul``), sums in
float32, straight-through gradients (those of the exact matmul). The weight itself is left
as it is (an earlier transform may have quantised or pruned it). Simulation: each product
is emulated with integer operations - far slower than a matmul.

:class:`LMulArithmetic` (the fields and the product) is shared with L-Mul attention."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.estimators import straight_through
from sparsejax.numerics.lmul import lmul_matmul
from sparsejax.transforms.base import (
    Context,
    CustomMatmul,
    Metrics,
    Site,
    SpecError,
    State,
    register,
)
from sparsejax.transforms.quant.common import Quantizer

__all__ = ["LMulArithmetic", "LMulLinear"]


@dataclass(frozen=True, kw_only=True)
class LMulArithmetic:
    """``mantissa_bits`` of the operands; ``k_tile``: products formed at once along the
    contracted axis (memory: ``(..., M, k_tile, N)`` floats)."""

    mantissa_bits: int = 4
    k_tile: int = 16

    def check(self) -> None:
        if not 1 <= self.mantissa_bits <= 23:
            raise SpecError("mantissa_bits", f"mantissa_bits must be in [1, 23], got "
                            f"{self.mantissa_bits}")
        if self.k_tile < 1:
            raise SpecError("k_tile", f"k_tile must be at least 1, got {self.k_tile}")

    def product(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``a @ b`` (``jnp.matmul``'s shapes) by L-Mul, with the exact product's
        gradient."""
        return straight_through(jnp.matmul(a, b),
                                lmul_matmul(a, b, self.mantissa_bits, self.k_tile))


@register("quant", "lmul")
@dataclass(frozen=True, kw_only=True)
class LMulLinear(LMulArithmetic, CustomMatmul, Quantizer):
    """The linear's ``x @ W`` by L-Mul (:class:`LMulArithmetic`)."""

    roles = ("weights",)

    def check(self) -> None:
        LMulArithmetic.check(self)

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        return x, state, {}

    @property
    def exclusive_matmul(self) -> str | None:
        return "method"

    def matmul(self, x: jax.Array, w: jax.Array, state: State, ctx: Context
               ) -> tuple[jax.Array, State]:
        return self.product(x, w.astype(x.dtype)), state
