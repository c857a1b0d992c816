"""SNIP (Lee et al., ICLR 2019; docs/methods.md §8): connection sensitivity ``|g * w|``
from one batch at initialisation, keep the top of every layer's budget, fixed after."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import Context, Site, State, View, register
from sparsejax.transforms.sparsity.unstructured import UnstructuredSparsity, top_k_mask

__all__ = ["SNIP"]


@register("sparsity", "snip")
@dataclass(frozen=True, kw_only=True)
class SNIP(UnstructuredSparsity):
    """The scores use the gradient of the first training batch, which the gradient-time
    hook of step 0 sees. Deviation: that step's forward is still dense (the paper scores
    on a batch before training); its update is already masked."""

    def is_update(self, step: jax.Array) -> jax.Array:
        return step == 0

    def new_mask(self, site: Site, view: View, grad: jax.Array, ctx: Context
                 ) -> tuple[jax.Array, State]:
        return top_k_mask(jnp.abs(grad * view.x), self.keep(site)), {}
