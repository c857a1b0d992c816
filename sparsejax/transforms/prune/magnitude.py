"""Post-training magnitude pruning (docs/methods.md §9.1): keep the largest ``|W_ij|``
per output column (unstructured) or per group of ``m`` along the inputs (N:M); the
calibration data is not used. (The training-time ``sparsity: {method: magnitude}`` ranks
the whole layer instead.)"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import register
from sparsejax.transforms.prune.common import PostTrainingPruning, PruneResult, pattern_mask

__all__ = ["MagnitudePruning"]


@register("prune", "magnitude")
@dataclass(frozen=True, kw_only=True)
class MagnitudePruning(PostTrainingPruning):
    """Score ``|W_ij|``, compared within each output column or N:M group."""

    def prune(self, w: jax.Array, h: jax.Array | None = None) -> PruneResult:
        mask = pattern_mask(jnp.abs(w), self)
        return PruneResult(jnp.where(mask, w, 0.0), mask)
