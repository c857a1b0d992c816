"""``dense``: no sparsity. A rule with ``sparsity: {method: dense}`` keeps the weights
dense; with ``mvue`` or ``fp8`` it is the dense baseline of those backward / precision
settings (the same sparse-layout matmul, docs/methods.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.transforms.base import Context, Metrics, Site, State, register
from sparsejax.transforms.sparsity.nm import SparseMatmul

__all__ = ["Dense"]


@register("sparsity", "dense")
@dataclass(frozen=True, kw_only=True)
class Dense(SparseMatmul):
    """The identity on the weight. N:M fields a config carries for other methods are
    ignored at their defaults (``build_spec``), so ``rules.0.sparsity.method=dense`` works
    on any sparse config."""

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        return x, state, {}
