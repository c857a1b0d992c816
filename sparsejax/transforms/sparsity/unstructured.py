"""What the unstructured sparsity methods share (docs/methods.md §8): a boolean mask over
the whole kernel kept as state; a per-layer budget over the layers one rule matches
(``uniform`` or ``erk``); the forward ``w * mask`` with a straight-through gradient, and a
gradient-time hook (``Transform.update``) that changes the mask on the method's schedule,
zeroes pruned and newly grown weights, and removes the gradient of pruned weights - so the
optimiser sees the masked gradient while the hook sees the dense one (RigL's growth
criterion, SNIP's scores).

Exact budgets: a layer of ``size`` weights at density ``d`` keeps ``round(d * size)`` of
them after every update (ties broken towards the lower flat index)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp

from sparsejax.estimators import straight_through
from sparsejax.transforms.base import (
    Context,
    GradientHook,
    Metrics,
    Site,
    SpecError,
    State,
    Transform,
    View,
)

__all__ = ["DISTRIBUTIONS", "DropAndGrow", "UnstructuredSparsity", "drop_and_grow",
           "erk_densities", "top_k_mask"]

DISTRIBUTIONS = ("uniform", "erk")


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020): layer ``l`` of shape ``(n_in,
    n_out)`` gets density ``eps * (n_in + n_out) / (n_in * n_out)`` (the sum of its
    dimensions over their product, for any rank), with ``eps`` such that the layers
    together keep ``(1 - sparsity)`` of their weights. A layer whose density would exceed 1
    stays dense and ``eps`` is solved again for the others, until none exceeds."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    budget = (1.0 - sparsity) * sum(sizes)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        left = budget - sum(sizes[i] for i in dense)
        if not free:
            return [1.0] * len(shapes)
        eps = left / sum(raw[i] * sizes[i] for i in free)
        over = {i for i in free if eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def top_k_mask(score: jax.Array, k: int | jax.Array) -> jax.Array:
    """Boolean mask of the ``k`` largest entries of ``score`` (exactly ``k``; ties go to
    the lower flat index; ``k`` may be traced)."""
    flat = score.ravel()
    order = jnp.argsort(-flat, stable=True)
    keep = jnp.arange(flat.size) < k
    return jnp.zeros(flat.shape, bool).at[order].set(keep).reshape(score.shape)


@dataclass(frozen=True, kw_only=True)
class UnstructuredSparsity(GradientHook, Transform):
    """Base of the unstructured methods. ``sparsity``: fraction of zeros the matched layers
    reach together; ``distribution``: ``uniform`` (every layer at ``sparsity``) or ``erk``.
    ``density`` is set per layer by :meth:`plan` (not configuration).

    Subclasses give :meth:`initial_mask` and, for masks that change, :meth:`is_update` and
    :meth:`new_mask`; the base does the budget, the forward, the gradient and the counts.
    """

    sparsity: float = 0.9
    distribution: str = "uniform"
    density: float = field(default=-1.0, metadata={"internal": True})

    # counts of the last update (per layer); their size-weighted view is ``mask_change``,
    # the dropped (= grown) share of the layer's active weights
    per_layer_metrics = ("dropped", "grown")

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise SpecError("sparsity", f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.distribution not in DISTRIBUTIONS:
            raise SpecError("distribution", f"distribution '{self.distribution}' is not one "
                            f"of {'|'.join(DISTRIBUTIONS)}")

    def plan(self, sites: Sequence[Site]) -> list[Transform]:
        shapes = [s.shape for s in sites]
        densities = (erk_densities(shapes, self.sparsity) if self.distribution == "erk"
                     else [1.0 - self.sparsity] * len(sites))
        for site, density in zip(sites, densities, strict=True):
            if round(density * site.size) < 1:
                raise SpecError("sparsity", f"a {self.distribution} budget of sparsity "
                                f"{self.sparsity} keeps no weight of a layer of shape "
                                f"{site.shape}; lower the sparsity")
        return [replace(self, density=d) for d in densities]

    def keep(self, site: Site) -> int:
        """Weights this layer keeps (its planned density, else ``1 - sparsity``)."""
        density = self.density if self.density >= 0 else 1.0 - self.sparsity
        return round(density * site.size)

    @property
    def produces_zeros(self) -> bool:
        return True

    # ------------------------------------------------------------------ method hooks
    def initial_mask(self, site: Site, x: jax.Array, key: jax.Array) -> jax.Array:
        """The mask at set-up (default: all kept, pruned by the first update)."""
        return jnp.ones(site.shape, bool)

    def is_update(self, step: jax.Array) -> jax.Array:
        """Whether the mask changes at ``step`` (default: never)."""
        return jnp.zeros((), bool)

    def new_mask(self, site: Site, view: View, grad: jax.Array, ctx: Context
                 ) -> tuple[jax.Array, State]:
        """The mask after an update at ``ctx.step`` and method state to record."""
        return view.state["mask"], {}

    def extra_state(self, site: Site) -> State:
        """Method state beside the mask and the counts (zeros of fixed shapes)."""
        return {}

    # ------------------------------------------------------------------ the transform
    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        mask = self.initial_mask(site, x, key)
        return {"mask": mask, "dropped": jnp.zeros((), jnp.int32),
                "grown": jnp.zeros((), jnp.int32), "grown_mask": jnp.zeros(site.shape, bool),
                "grown_survival": jnp.ones((), jnp.float32), **self.extra_state(site)}

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        # straight-through: the dense gradient reaches the update hook, which masks it
        return straight_through(x, jnp.where(state["mask"], x, jnp.zeros_like(x))), state, {}

    def update(self, site: Site, view: View, grad: jax.Array, ctx: Context
               ) -> tuple[jax.Array, State, jax.Array, Metrics]:
        old = view.state["mask"]

        def changed():
            mask, extra = self.new_mask(site, view, grad, ctx)
            grown = mask & ~old
            prev = view.state["grown_mask"]
            survival = (jnp.sum(prev & mask) / jnp.maximum(jnp.sum(prev), 1)).astype(jnp.float32)
            return {**view.state, **extra, "mask": mask, "grown_mask": grown,
                    "dropped": jnp.sum(old & ~mask).astype(jnp.int32),
                    "grown": jnp.sum(grown).astype(jnp.int32),
                    "grown_survival": jnp.where(jnp.any(prev), survival,
                                                view.state["grown_survival"])}

        state = jax.lax.cond(self.is_update(ctx.step), changed, lambda: dict(view.state))
        mask = state["mask"]
        # pruned weights are zero, grown ones start at zero; pruned weights get no gradient
        x = jnp.where(mask & old, view.x, jnp.zeros_like(view.x))
        metrics = {"dropped": state["dropped"], "grown": state["grown"],
                   "grown_survival": state["grown_survival"],
                   "mask_change": state["dropped"] / max(self.keep(site), 1)}
        return x, state, jnp.where(mask, grad, jnp.zeros_like(grad)), {
            **metrics, **self.update_metrics(state)}

    def update_metrics(self, state: State) -> Metrics:
        """Method metrics read from the state after the hook (logged every step)."""
        return {}

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        return {"sparsity": 1.0 - jnp.mean(after.state["mask"].astype(jnp.float32))}


def drop_and_grow(mask: jax.Array, magnitude: jax.Array, grow_score: jax.Array,
                  active: int, count: jax.Array | int) -> jax.Array:
    """The mask after dropping the ``count`` active entries of smallest ``magnitude`` and
    growing ``count`` entries of largest ``grow_score`` among those inactive *before* the
    drop (a dropped weight is not regrown in the same update). ``active``: the number of
    entries ``mask`` holds; the count is capped by the inactive entries."""
    count = jnp.minimum(count, mask.size - active)
    kept = top_k_mask(jnp.where(mask, magnitude, -jnp.inf), active - count)
    grown = top_k_mask(jnp.where(mask, -jnp.inf, grow_score), count)
    return kept | grown


@dataclass(frozen=True, kw_only=True)
class DropAndGrow(UnstructuredSparsity):
    """Base of SET and RigL: a static mask of the layer's budget (random, as both papers
    start), changed every ``dt`` steps before ``end_fraction`` of training by
    :func:`drop_and_grow`; :meth:`drop_count` and :meth:`grow_score` are the method."""

    dt: int = 100
    end_fraction: float = 1.0
    end_step: int = field(default=0, metadata={"internal": True})

    def check(self) -> None:
        super().check()
        if self.dt <= 0:
            raise SpecError("dt", f"dt must be > 0, got {self.dt}")
        if not 0.0 < self.end_fraction <= 1.0:
            raise SpecError("end_fraction", "end_fraction must be in (0, 1] (updates end "
                            f"within training), got {self.end_fraction}")

    def bind(self, total_steps: int | None) -> DropAndGrow:
        return replace(self, end_step=int(self.end_fraction * (total_steps or 0)))

    def initial_mask(self, site: Site, x: jax.Array, key: jax.Array) -> jax.Array:
        return top_k_mask(jax.random.uniform(key, site.shape), self.keep(site))

    def is_update(self, step: jax.Array) -> jax.Array:
        return (step > 0) & (step % self.dt == 0) & (step < self.end_step)

    def drop_count(self, site: Site, step: jax.Array) -> jax.Array | int:
        raise NotImplementedError

    def grow_score(self, view: View, grad: jax.Array, ctx: Context) -> jax.Array:
        raise NotImplementedError

    def new_mask(self, site: Site, view: View, grad: jax.Array, ctx: Context
                 ) -> tuple[jax.Array, State]:
        mask = drop_and_grow(view.state["mask"], jnp.abs(view.x),
                             self.grow_score(view, grad, ctx), self.keep(site),
                             self.drop_count(site, ctx.step))
        return mask, {}
