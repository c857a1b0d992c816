"""Logarithms of the modified Bessel functions, in XLA, with derivatives in both arguments.

``log_iv(v, x)``, ``log_kv(v, x)``, ``log_ive(v, x) = log I_v(x) - x`` and
``log_kve(v, x) = log K_v(x) + x``: the log-space algorithm of Plesner, Sorensen and
Hauberg (ICS 2024; ``../shared/docs/METHODS.md`` section 6) - large-argument (Hankel),
uniform (Debye) and small-argument formulas chosen per point - shared with the Pallas
kernel ``sparsejax.kernels.log_bessel`` (its ``log_bessel_reference`` is this module's
evaluation). Nothing overflows or underflows: ``log_ive(1e4, 1e3)`` is finite where
SciPy's ``ive`` is 0.

Broadcasting, float32 and float64, jit / vmap / grad. Edge cases: ``x = 0`` gives
``log I_0 = 0``, ``log I_v = -inf`` (v > 0) and ``log K = +inf``; negative orders use
``I_{-v} = I_v + (2/pi) sin(v pi) K_v`` and ``K_{-v} = K_v``; ``x < 0`` gives NaN; NaN
passes through.

Derivatives (``jax.custom_jvp``, so forward and reverse mode both work):

* in ``x``, the closed forms ``d/dx log I_v = I_{v+1}/I_v + v/x`` and
  ``d/dx log K_v = -K_{v-1}/K_v - v/x``, the ratios evaluated in log space;
* in ``v``, the derivative of the expansion in use at that point (forward-mode
  differentiation of the formula the region selects; the formulas are smooth in ``v``
  inside their regions).

Deviation from the paper's GPU code: every point evaluates all three formulas and
selects (the reference's branch-free select, also what the kernel does) instead of
dispatching each point to one formula, so the cost per point is the sum of the three.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsejax.kernels.log_bessel import common_float, log_bessel_reference

__all__ = ["log_ive", "log_iv", "log_kv", "log_kve"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _log_bessel(v: jax.Array, x: jax.Array, kind: str, scaled: bool) -> jax.Array:
    return log_bessel_reference(v, x, kind, scaled)


@_log_bessel.defjvp
def _log_bessel_jvp(kind: str, scaled: bool, primals, tangents):
    v, x = primals
    v_dot, x_dot = tangents
    value, d_dv = jax.jvp(lambda order: log_bessel_reference(order, x, kind, scaled), (v,),
                          (jnp.ones_like(v),))
    if kind == "i":  # I_{v+1} / I_v + v / x (- 1 scaled: the ratio of scaled forms is equal)
        neighbour = _log_bessel(v + 1.0, x, "i", scaled)
        d_dx = jnp.exp(neighbour - value) + v / x - (1.0 if scaled else 0.0)
    else:  # -K_{v-1} / K_v - v / x (+ 1 scaled)
        neighbour = _log_bessel(v - 1.0, x, "k", scaled)
        d_dx = -jnp.exp(neighbour - value) - v / x + (1.0 if scaled else 0.0)
    return value, d_dv * v_dot + d_dx * x_dot


def _public(kind: str, scaled: bool):
    def f(v: jax.Array, x: jax.Array) -> jax.Array:
        return _log_bessel(*common_float(v, x), kind, scaled)

    return f


log_iv = _public("i", False)
log_iv.__doc__ = """``log I_v(x)``; ``v``, ``x`` broadcast, float32 or float64."""
log_ive = _public("i", True)
log_ive.__doc__ = """``log I_v(x) - x`` (the log of SciPy's ``ive``)."""
log_kv = _public("k", False)
log_kv.__doc__ = """``log K_v(x)``; ``v``, ``x`` broadcast, float32 or float64."""
log_kve = _public("k", True)
log_kve.__doc__ = """``log K_v(x) + x`` (the log of SciPy's ``kve``)."""
