"""Static random pruning (docs/methods.md §8): a mask drawn once per layer from its key,
exactly the layer's budget, never changed - the baseline dynamic methods must beat."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.transforms.base import Site, register
from sparsejax.transforms.sparsity.unstructured import UnstructuredSparsity, top_k_mask

__all__ = ["RandomMask"]


@register("sparsity", "random")
@dataclass(frozen=True, kw_only=True)
class RandomMask(UnstructuredSparsity):
    """Keeps a uniformly random subset of ``keep`` weights per layer."""

    def initial_mask(self, site: Site, x: jax.Array, key: jax.Array) -> jax.Array:
        return top_k_mask(jax.random.uniform(key, site.shape), self.keep(site))
