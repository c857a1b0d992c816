"""LSQ (Esser et al., ICLR 2020): a learned per-tensor step (docs/methods.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.quant import lsq_init_step, lsq_range, lsq_with_stats
from sparsejax.transforms.base import Context, Metrics, Site, SpecError, State, register
from sparsejax.transforms.quant.common import Quantizer

__all__ = ["LSQ", "UNIT_GAUSSIAN_ABS_MEAN"]

# E|x| of a unit-variance Gaussian: the activation step is initialised for the inputs of
# our linear layers (LayerNorm outputs, GELU of them) instead of from a first batch.
UNIT_GAUSSIAN_ABS_MEAN = math.sqrt(2.0 / math.pi)


@register("quant", "lsq")
@dataclass(frozen=True, kw_only=True)
class LSQ(Quantizer):
    """``s * round(clip(x / s, -Q_n, Q_p))`` with the step ``s`` a trainable parameter
    (trained with the weights; a scalar, so never weight-decayed), initialised to
    ``2 E|x| / sqrt(Q_p)`` (weights: their mean magnitude at set-up; activations: a unit
    Gaussian's). Its gradient is scaled by ``1 / sqrt(count * Q_p)``, ``count`` the number
    of weights or of input features. ``bits`` >= 1.5."""

    bits: float = 4.0

    def check(self) -> None:
        super().check()
        try:
            lsq_range(self.bits)
        except ValueError as err:
            raise SpecError("bits", str(err)) from None

    def params(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        abs_mean = (float(jnp.mean(jnp.abs(x))) if site.role == "weights"
                    else UNIT_GAUSSIAN_ABS_MEAN)
        return {"step": jnp.asarray(lsq_init_step(abs_mean, self.bits), jnp.float32)}

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        grad_scale = 1.0 / math.sqrt(site.size * lsq_range(self.bits)[1])
        y, stats = lsq_with_stats(x, params["step"], self.bits, grad_scale)
        return y, state, stats
