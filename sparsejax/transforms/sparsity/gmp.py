"""Gradual magnitude pruning (Zhu & Gupta 2017; docs/methods.md §8): dense-to-sparse,
the sparsity rising on a cubic schedule, the mask recomputed by magnitude every ``dt``
steps."""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import Context, Site, SpecError, State, View, register
from sparsejax.transforms.sparsity.unstructured import UnstructuredSparsity, top_k_mask

__all__ = ["GMP", "gmp_sparsity"]


def gmp_sparsity(step: jax.Array | int, s_i: float, s_f: float, t0: int, dt: int, n: int
                 ) -> jax.Array:
    """``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` for ``t0 <= t <= t0 + n dt``
    (``s_i`` before, ``s_f`` after)."""
    frac = jnp.clip((jnp.asarray(step, jnp.float32) - t0) / (n * dt), 0.0, 1.0)
    return s_f + (s_i - s_f) * (1.0 - frac) ** 3


@register("sparsity", "gmp")
@dataclass(frozen=True, kw_only=True)
class GMP(UnstructuredSparsity):
    """``initial_sparsity`` (s_i) at step ``start`` (t0) to the layer's budget (s_f) in
    ``updates`` (n) mask updates ``dt`` steps apart; ``updates: 0`` ends the ramp at
    ``end_fraction`` of training. Pruned weights stay pruned (magnitudes are those of the
    masked weight)."""

    initial_sparsity: float = 0.0
    start: int = 0
    dt: int = 100
    updates: int = 0
    end_fraction: float = 0.75

    def check(self) -> None:
        super().check()
        if self.dt <= 0:
            raise SpecError("dt", f"dt must be > 0, got {self.dt}")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise SpecError("initial_sparsity", "initial_sparsity must be in [0, sparsity], "
                            f"got {self.initial_sparsity}")
        if self.start < 0 or self.updates < 0:
            raise SpecError("start" if self.start < 0 else "updates", "must be >= 0")
        if not 0.0 < self.end_fraction <= 1.0:
            raise SpecError("end_fraction", "end_fraction must be in (0, 1] (the ramp ends "
                            f"within training), got {self.end_fraction}")

    def bind(self, total_steps: int | None) -> GMP:
        if self.updates or not total_steps:
            end = self.start + self.updates * self.dt
        else:
            end = int(self.end_fraction * total_steps)
        updates = max((end - self.start) // self.dt, 1)
        if total_steps and self.start + updates * self.dt > total_steps:
            raise SpecError("updates", f"the ramp ends at step {self.start + updates * self.dt}"
                            f", beyond training ({total_steps} steps)")
        return replace(self, updates=updates)

    def target(self, site: Site) -> float:
        """The layer's final sparsity s_f."""
        return 1.0 - self.keep(site) / site.size

    def initial_mask(self, site: Site, x: jax.Array, key: jax.Array) -> jax.Array:
        s_0 = min(self.initial_sparsity, self.target(site))
        return top_k_mask(jnp.abs(x), round((1.0 - s_0) * site.size))

    def is_update(self, step: jax.Array) -> jax.Array:
        since = step - self.start
        return (since > 0) & (since % self.dt == 0) & (since <= self.updates * self.dt)

    def new_mask(self, site: Site, view: View, grad: jax.Array, ctx: Context
                 ) -> tuple[jax.Array, State]:
        s_t = gmp_sparsity(ctx.step, min(self.initial_sparsity, self.target(site)),
                           self.target(site), self.start, self.dt, max(self.updates, 1))
        keep = jnp.round((1.0 - s_t) * site.size).astype(jnp.int32)
        score = jnp.where(view.state["mask"], jnp.abs(view.x), -1.0)
        return top_k_mask(score, keep), {}
