"""What the post-training pruning methods share (docs/methods.md §9): the budget (an
unstructured ``sparsity`` or an ``n:m`` pattern along the contracting axis), the mask kept
as state, the forward ``where(mask, w, 0)`` and the calibration hook.

A post-training method prunes a *trained* layer once, from its weight ``w`` ``(in, out)``
and the Gram matrix ``h = X^T X`` ``(in, in)`` of calibration inputs ``X`` (tokens, in)
(:meth:`PostTrainingPruning.prune`, a pure function); ``sparsejax.posttrain`` runs the
calibration pass and calls it layer by layer. Until then - a model built from a config
before its checkpoint is restored - the mask keeps the non-zeros the weight has, so a
layer pruned elsewhere keeps its zeros and a dense one stays dense. During fine-tuning
the mask is fixed: pruned weights get no gradient (the forward multiplies them by zero)
and stay exactly zero, as Adam's update of a weight whose gradient was always zero is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.errors import PruneError
from sparsejax.sparsity import check_nm, nm_mask
from sparsejax.transforms.base import (
    Context,
    GramCalibration,
    Metrics,
    Site,
    SpecError,
    State,
    Transform,
    View,
)

__all__ = ["DAMPENING", "PruneError", "PruneResult", "PostTrainingPruning", "column_mask",
           "compute_dtype", "dampened", "pattern_mask", "weighted_error"]

# SparseGPT's dampening: lambda = 1 % of the mean diagonal of H.
DAMPENING = 0.01


@dataclass(frozen=True)
class PruneResult:
    """``weight``: the effective dense weight ``(in, out)`` after pruning (the product of
    the factors for DSF); ``mask``: the kept entries of ``weight`` (None for DSF, whose
    product is dense); ``factors``: ``(A, B)`` with ``weight = A @ B`` where the method
    factorises (DSF), else None; ``factor_masks``: their kept entries; ``info``: per-method
    diagnostics (DSF: the weighted error after every outer round)."""

    weight: jax.Array
    mask: jax.Array | None = None
    factors: tuple[jax.Array, jax.Array] | None = None
    factor_masks: tuple[jax.Array, jax.Array] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        """Stored non-zeros: the mask's count, or the factor masks' together."""
        masks = self.factor_masks if self.factor_masks is not None else (self.mask,)
        return int(sum(jnp.sum(m) for m in masks))


def compute_dtype(*arrays: Any) -> jnp.dtype:
    """float64 when any input is float64 (``jax_enable_x64`` on), else float32: the
    methods compute in at least float32 whatever the weights' storage dtype."""
    return jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in arrays))


def dampened(h: jax.Array, w: jax.Array, fraction: float = DAMPENING
             ) -> tuple[jax.Array, jax.Array]:
    """``(H + lambda I, w)`` with ``lambda = fraction * mean(diag H)`` over the features
    that ever fired; a dead input feature (``H_jj = 0``) gets ``H_jj = 1`` and its row of
    ``w`` zeroed (it never contributes). Raises :class:`PruneError` when every feature is
    dead or the result is not positive definite."""
    dtype = compute_dtype(h, w)
    h, w = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    diag = jnp.diag(h)
    dead = diag == 0
    if bool(jnp.all(dead)):
        raise PruneError("the calibration Gram matrix is zero (no input ever reached the "
                         "layer): singular after dampening")
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[:, None], 0.0, w)
    damp = fraction * jnp.mean(jnp.diag(h))
    return h + damp * jnp.eye(h.shape[0], dtype=h.dtype), w


def weighted_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
    """``tr[(W - W^)^T H (W - W^)]`` = ``||X W - X W^||_F^2`` for ``H = X^T X``."""
    dtype = compute_dtype(w, w_hat, h)
    d = jnp.asarray(w, dtype) - jnp.asarray(w_hat, dtype)
    return jnp.sum(d * (jnp.asarray(h, dtype) @ d))


def column_mask(score: jax.Array, prune: int) -> jax.Array:
    """Keep-mask ``(in, out)`` pruning the ``prune`` lowest scores of every output column
    (ties: the lower input index is pruned first, as a stable ascending sort)."""
    order = jnp.argsort(score, axis=0, stable=True)
    ranks = jnp.argsort(order, axis=0, stable=True)
    return ranks >= prune


def pattern_mask(score: jax.Array, spec: PostTrainingPruning) -> jax.Array:
    """The keep-mask of a non-negative ``score`` ``(in, out)`` under ``spec``'s budget:
    the ``n`` largest of every group of ``m`` along the inputs, or per output column the
    ``round(sparsity * in)`` lowest pruned."""
    if spec.n:
        return nm_mask(score, spec.n, spec.m, axis=0)
    return column_mask(score, round(spec.sparsity * score.shape[0]))


@dataclass(frozen=True, kw_only=True)
class PostTrainingPruning(GramCalibration, Transform):
    """Base of the post-training methods (``prune:`` blocks of path rules). ``sparsity``:
    the fraction of weights removed (unstructured); ``n``, ``m``: an N:M pattern along the
    contracting axis instead (``n: 0`` = unstructured)."""

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def check(self) -> None:
        if self.n or self.m:
            if not 1 <= self.n < self.m:
                raise SpecError("n", f"N:M pattern {self.n}:{self.m} needs 1 <= n < m")
            implied = 1.0 - self.n / self.m
            if self.sparsity not in (0.5, implied):  # 0.5: the field's default
                raise SpecError("sparsity", f"sparsity {self.sparsity} contradicts the "
                                f"{self.n}:{self.m} pattern (sparsity {implied}); give one")
            object.__setattr__(self, "sparsity", implied)  # what config.yaml records
        elif not 0.0 <= self.sparsity < 1.0:
            raise SpecError("sparsity", f"sparsity must be in [0, 1), got {self.sparsity}")

    def check_site(self, site: Site) -> None:
        if self.n:
            check_nm(site.shape, self.n, self.m, axis=0)

    @property
    def pattern(self) -> str:
        """``"2:4"`` or ``"50%"`` (reports)."""
        return f"{self.n}:{self.m}" if self.n else f"{self.sparsity:.0%}"

    @property
    def produces_zeros(self) -> bool:
        return True

    @property
    def mask_group(self) -> int | None:
        return self.m or None

    def blocking(self, site: Site) -> list[tuple[str, int]]:
        return [(f"N:M groups (m={self.m})", self.m)] if self.n else []

    # ------------------------------------------------------------------ the method
    def prune(self, w: jax.Array, h: jax.Array) -> PruneResult:
        """Prune ``w`` ``(in, out)`` given ``h = X^T X`` ``(in, in)`` of the calibration
        inputs; pure."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the transform
    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {"mask": x != 0, "pruned": jnp.zeros((), bool)}

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        return jnp.where(state["mask"], x, jnp.zeros_like(x)), state, {}

    def calibrate(self, site: Site, view: View, h: jax.Array) -> View:
        """The layer after pruning: ``(weight, params, state)`` from the trained weight
        ``view.x`` and the calibration Gram matrix ``h``."""
        result = self.prune(view.x, h)
        return View(jnp.where(result.mask, result.weight, 0.0).astype(view.x.dtype),
                    view.params, {**view.state, "mask": result.mask,
                                  "pruned": jnp.ones((), bool)})

    def is_calibrated(self, state: State) -> bool:
        return bool(state["pruned"])

    def stored_density(self, view: View) -> float:
        """Stored non-zeros (every mask of the method's state: DSF keeps one per factor)
        over the weight's size."""
        stored = sum(int(jnp.sum(v)) for k, v in view.state.items() if "mask" in k)
        return stored / view.x.size

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        return {"sparsity": 1.0 - jnp.mean(after.state["mask"].astype(jnp.float32))}
