"""absmax-STE: symmetric round-to-nearest with a per-block absmax scale and an identity
gradient, the classic baseline (docs/methods.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.quant import absmax_with_stats
from sparsejax.transforms.base import Context, Metrics, Site, State, register
from sparsejax.transforms.quant.common import Quantizer

__all__ = ["AbsmaxSTE"]


@register("quant", "absmax_ste")
@dataclass(frozen=True, kw_only=True)
class AbsmaxSTE(Quantizer):
    """``clip(round(x / s)) * s`` with ``s = max|x| / Q`` per block of ``block_size``
    (ternary and 1-bit: ``s = mean|x|``); gradient passed straight through."""

    bits: float = 4.0
    block_size: int = 128

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        y, stats = absmax_with_stats(x, self.bits, self.block_size, site.axis)
        return y, state, stats
