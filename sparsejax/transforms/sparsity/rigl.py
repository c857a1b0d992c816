"""RigL (Evci et al., ICML 2020; docs/methods.md §8): every ``dt`` steps until ``t_end``
drop ``f(t) = alpha / 2 (1 + cos(pi t / t_end))`` of the active weights with the smallest
magnitude and regrow as many where the dense gradient is largest among the inactive ones;
regrown weights start at zero."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import Context, Metrics, Site, SpecError, State, View, register
from sparsejax.transforms.sparsity.unstructured import DropAndGrow, drop_and_grow

__all__ = ["RigL", "rigl_drop_fraction"]


def rigl_drop_fraction(step: jax.Array | int, alpha: float, t_end: int) -> jax.Array:
    """``f(t) = alpha / 2 (1 + cos(pi t / t_end))``."""
    return alpha / 2 * (1.0 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / t_end))


@register("sparsity", "rigl")
@dataclass(frozen=True, kw_only=True)
class RigL(DropAndGrow):
    """``alpha``: the initial drop fraction (paper 0.3); ``dt``: steps between updates
    (paper 100); ``end_fraction``: updates stop at this fraction of training (paper 0.75).
    The dense gradient is the one the gradient-time hook sees (the forward's
    straight-through mask passes it whole; the optimiser then gets it masked). Also logs
    the mean |gradient| of the grown and of the dropped weights at the last update."""

    alpha: float = 0.3
    end_fraction: float = 0.75

    def check(self) -> None:
        super().check()
        if not 0.0 < self.alpha < 1.0:
            raise SpecError("alpha", f"alpha must be in (0, 1), got {self.alpha}")

    def drop_count(self, site: Site, step: jax.Array) -> jax.Array:
        f = rigl_drop_fraction(step, self.alpha, max(self.end_step, 1))
        return jnp.round(f * self.keep(site)).astype(jnp.int32)

    def grow_score(self, view: View, grad: jax.Array, ctx: Context) -> jax.Array:
        return jnp.abs(grad)

    def extra_state(self, site: Site) -> State:
        return {"grad_grown": jnp.zeros((), jnp.float32),
                "grad_dropped": jnp.zeros((), jnp.float32)}

    def new_mask(self, site: Site, view: View, grad: jax.Array, ctx: Context
                 ) -> tuple[jax.Array, State]:
        old = view.state["mask"]
        mask = drop_and_grow(old, jnp.abs(view.x), jnp.abs(grad), self.keep(site),
                             self.drop_count(site, ctx.step))
        g = jnp.abs(grad).astype(jnp.float32)

        def mean_over(sel):
            return jnp.sum(jnp.where(sel, g, 0.0)) / jnp.maximum(jnp.sum(sel), 1)

        return mask, {"grad_grown": mean_over(mask & ~old), "grad_dropped": mean_over(old & ~mask)}

    def update_metrics(self, state: State) -> Metrics:
        return {"grad_grown": state["grad_grown"], "grad_dropped": state["grad_dropped"]}
