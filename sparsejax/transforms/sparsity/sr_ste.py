"""SR-STE (Zhou et al., ICLR 2021): STE plus decay of the pruned weights in the gradient
(docs/methods.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.sparsity import sr_ste
from sparsejax.transforms.base import Context, Metrics, Site, SpecError, State, register
from sparsejax.transforms.sparsity.nm import HardNMSparsity

__all__ = ["SRSTE"]


@register("sparsity", "sr_ste")
@dataclass(frozen=True, kw_only=True)
class SRSTE(HardNMSparsity):
    """Hard mask forward; gradient ``g + decay * (1 - E) * w`` (``decay`` is the paper's
    lambda_W, 2e-4 in the reference code)."""

    decay: float = 2e-4

    def check(self) -> None:
        super().check()
        if self.decay < 0:
            raise SpecError("decay", f"SR-STE decay must be >= 0, got {self.decay}")

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        return sr_ste(x, self.n, self.m, 0, self.decay), state, {}
