"""S-STE (Hu, Zhu, Chen, NeurIPS 2024): continuous pruning by a soft threshold, scaled by
a frozen least-squares beta (docs/methods.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from sparsejax.sparsity import sste, sste_scale
from sparsejax.transforms.base import Context, Metrics, Site, State, View, register
from sparsejax.transforms.sparsity.nm import HardNMSparsity

__all__ = ["SSTE"]


@register("sparsity", "sste")
@dataclass(frozen=True, kw_only=True)
class SSTE(HardNMSparsity):
    """``beta * S(w)`` forward with ``S(w) = sign(w) max(|w| - tau, 0)`` per group,
    identity gradient to ``w``. ``beta`` is fitted to the weight the layer has when the
    rule applies (after ``train.init_from``) and frozen: it is state, not a parameter."""

    per_layer_metrics = ("beta",)

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {**super().init(site, x, key), "beta": sste_scale(x, self.n, self.m, 0)}

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        return sste(x, state["beta"], self.n, self.m, 0), state, {}

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        return {**super().step_metrics(site, before, after), "beta": after.state["beta"]}
