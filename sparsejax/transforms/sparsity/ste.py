"""STE: hard N:M mask forward, identity gradient to the dense weight (docs/methods.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.sparsity import ste
from sparsejax.transforms.base import Context, Metrics, Site, State, register
from sparsejax.transforms.sparsity.nm import HardNMSparsity

__all__ = ["STE"]


@register("sparsity", "ste")
@dataclass(frozen=True, kw_only=True)
class STE(HardNMSparsity):
    """``E * w`` forward (the top-n magnitudes of every group of m), gradient passed
    straight through to every entry of ``w``."""

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        return ste(x, self.n, self.m, 0), state, {}
