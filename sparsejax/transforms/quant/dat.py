"""DAT, the denoising affine transform (Ye et al. 2024, arXiv 2409.09245;
docs/methods.md §3): quantisation noise on the integer grid, then a ridge-regression
dequantiser whose scale and offset carry the gradient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax

from sparsejax.quant import denoise_with_stats
from sparsejax.transforms.base import (
    Context,
    Metrics,
    Site,
    SpecError,
    State,
    Transform,
    register,
)
from sparsejax.transforms.quant.common import Quantizer

__all__ = ["DAT"]


@register("quant", "dat")
@dataclass(frozen=True, kw_only=True)
class DAT(Quantizer):
    """``bits`` (1..8, 1.5 ternary); ``affine``: min/max grid with an offset (else the
    symmetric linear form, which keeps exact zeros); ``lam``: the ridge penalty;
    ``block_size``: entries per block along the contracting axis."""

    bits: float = 4.0
    affine: bool = True
    lam: float = 0.01
    block_size: int = 128

    def check(self) -> None:
        super().check()
        if not self.lam >= 0:
            raise SpecError("lam", f"must be >= 0, got {self.lam}")

    def check_after(self, earlier: Sequence[Transform]) -> None:
        if self.affine and any(t.produces_zeros for t in earlier):
            raise SpecError("affine", "affine DAT would fill the pruned zeros of a sparse "
                            "layer; set affine: false (the linear form, docs/methods.md §3)")

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        y, stats = denoise_with_stats(x, self.bits, self.affine, self.lam, self.block_size,
                                      site.axis)
        return y, state, stats
