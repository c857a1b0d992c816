"""Wanda (Sun et al. 2023; docs/methods.md §9.2): pruning by weights and activations.
The score of weight ``W_ij`` (input ``i``, output ``j``) is ``|W_ij| * ||X_i||_2``, the
norm of input feature ``i`` over the calibration tokens (``sqrt(H_ii)``); each output
column (unstructured) or each N:M group along the inputs keeps its largest scores. The
kept weights are not changed."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import register
from sparsejax.transforms.prune.common import (
    PostTrainingPruning,
    PruneResult,
    compute_dtype,
    pattern_mask,
)

__all__ = ["Wanda", "wanda_score"]


def wanda_score(w: jax.Array, h: jax.Array) -> jax.Array:
    """``|W_ij| * ||X_i||_2`` ``(in, out)``, with ``||X_i||_2^2 = H_ii`` (the Gram
    matrix's diagonal is the per-feature sum of squares); in float32, or float64 for
    float64 inputs."""
    dtype = compute_dtype(w, h)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(jnp.asarray(h, dtype)), 0.0))
    return jnp.abs(jnp.asarray(w, dtype)) * norms[:, None]


@register("prune", "wanda")
@dataclass(frozen=True, kw_only=True)
class Wanda(PostTrainingPruning):
    """Wanda's per-output comparison group; N:M groups along the inputs."""

    def prune(self, w: jax.Array, h: jax.Array) -> PruneResult:
        mask = pattern_mask(wanda_score(w, h), self)
        return PruneResult(jnp.where(mask, w, 0.0), mask)
