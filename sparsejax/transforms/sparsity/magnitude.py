"""One-shot magnitude pruning (docs/methods.md §8): at ``at_step`` keep the largest
magnitudes of every matched layer (its budget), then keep that mask."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import Context, Site, SpecError, State, View, register
from sparsejax.transforms.sparsity.unstructured import UnstructuredSparsity, top_k_mask

__all__ = ["Magnitude"]


@register("sparsity", "magnitude")
@dataclass(frozen=True, kw_only=True)
class Magnitude(UnstructuredSparsity):
    """``at_step``: the optimiser step whose weights are pruned (0: the weights the rule
    finds, e.g. after ``train.init_from``, before any update)."""

    at_step: int = 0

    def check(self) -> None:
        super().check()
        if self.at_step < 0:
            raise SpecError("at_step", f"at_step must be >= 0, got {self.at_step}")

    def initial_mask(self, site: Site, x: jax.Array, key: jax.Array) -> jax.Array:
        if self.at_step == 0:
            return top_k_mask(jnp.abs(x), self.keep(site))
        return jnp.ones(site.shape, bool)

    def is_update(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(self.at_step > 0) & (step == self.at_step)

    def new_mask(self, site: Site, view: View, grad: jax.Array, ctx: Context
                 ) -> tuple[jax.Array, State]:
        return top_k_mask(jnp.abs(view.x), self.keep(site)), {}
