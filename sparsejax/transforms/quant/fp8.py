"""FP8 simulation: a per-tensor amax-scaled round trip through E4M3 or E5M2 with an
identity gradient (docs/methods.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.quant import FP8_FORMATS, fp8_with_stats
from sparsejax.transforms.base import Context, Metrics, Site, SpecError, State, register
from sparsejax.transforms.quant.common import Quantizer

__all__ = ["FP8"]


@register("quant", "fp8")
@dataclass(frozen=True, kw_only=True)
class FP8(Quantizer):
    """``fmt``: ``e4m3`` or ``e5m2``."""

    fmt: str = "e4m3"

    def check(self) -> None:
        if self.fmt not in FP8_FORMATS:
            raise SpecError("fmt", f"fmt '{self.fmt}' is not one of {'|'.join(FP8_FORMATS)}")

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        y, stats = fp8_with_stats(x, self.fmt)
        return y, state, stats
