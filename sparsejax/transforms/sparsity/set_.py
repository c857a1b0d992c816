"""SET (Mocanu et al., Nature Communications 2018; docs/methods.md §8): every ``dt``
steps drop the fraction ``zeta`` of active weights with the smallest magnitude and regrow
as many at random among the inactive ones; regrown weights start at zero."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.transforms.base import Context, Site, SpecError, View, register
from sparsejax.transforms.sparsity.unstructured import DropAndGrow

__all__ = ["SET"]


@register("sparsity", "set")
@dataclass(frozen=True, kw_only=True)
class SET(DropAndGrow):
    """``zeta``: the fraction of active weights replaced per update (paper 0.3). Growth is
    drawn from the layer's key and the step, so a resumed run regrows the same weights."""

    zeta: float = 0.3

    def check(self) -> None:
        super().check()
        if not 0.0 < self.zeta < 1.0:
            raise SpecError("zeta", f"zeta must be in (0, 1), got {self.zeta}")

    def drop_count(self, site: Site, step: jax.Array) -> int:
        return round(self.zeta * self.keep(site))

    def grow_score(self, view: View, grad: jax.Array, ctx: Context) -> jax.Array:
        return jax.random.uniform(jax.random.fold_in(ctx.key, ctx.step), view.x.shape)
