"""Logarithms of the modified Bessel functions, in XLA, with derivatives in both arguments.

``log_iv(v, x)``, ``log_kv(v, x)``, ``log_ive(v, x) = log I_v(x) - x`` and
``log_kve(v, x) = log K_v(x) + x``: the log-space algorithm of Plesner, Sorensen and
Hauberg (ICS 2024; ``docs/methods.md`` section 6) - large-argument (Hankel),
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

Dispatch: the points are sorted by the formula that serves them and processed in chunks
of :data:`CHUNK`; in each chunk a formula runs only if one of its points is there
(``lax.cond``), so a point costs about one formula (the Pallas kernel, where lanes of a
block cannot skip work, computes all three and selects). The reflection term of a
negative order (which needs K) is computed only when some order is negative. Values
equal those of ``sparsejax.kernels.log_bessel.log_bessel_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsejax.kernels.log_bessel import (
    assemble,
    common_float,
    evaluate_region,
    region_of,
    regions,
)

CHUNK = 2048  # points per dispatch chunk

__all__ = ["log_ive", "log_iv", "log_kv", "log_kve"]


def _group_by_region(region: jax.Array, codes: tuple[int, ...]) -> jax.Array:
    """A permutation that lists the points region by region in the order of ``codes``
    (stable): a counting sort, O(n) with one cumulative sum per region and one scatter (a general
    argsort cost 0.19 s on 1e6 points, more than all three formulas together)."""
    n = region.size
    position = jnp.zeros_like(region)
    start = jnp.zeros((), region.dtype)
    for r in codes:
        inside = region == r
        position = jnp.where(inside, start + jnp.cumsum(inside, dtype=region.dtype) - 1,
                             position)
        start = start + jnp.sum(inside, dtype=region.dtype)
    return jnp.zeros_like(region).at[position].set(
        jnp.arange(n, dtype=region.dtype), unique_indices=True)


def _dispatch(v: jax.Array, x: jax.Array, kind: str, scaled: bool) -> jax.Array:
    """The positive-order formulas (``v >= 0``, ``x > 0`` finite), each evaluated only on
    chunks of region-sorted points that need it."""
    shape, n = x.shape, x.size
    v, x = v.reshape(-1), x.reshape(-1)
    region = region_of(v, x, kind)
    order = _group_by_region(region, regions(kind))
    chunks = max(1, -(-n // CHUNK))
    pad = chunks * CHUNK - n
    vs, xs, rs = (jnp.pad(a[order], (0, pad), mode="edge").reshape(chunks, -1)
                  for a in (v, x, region))

    def per_chunk(args):
        vc, xc, rc = args
        out = jnp.zeros_like(xc)
        for r in regions(kind):
            inside = rc == r
            run = functools.partial(evaluate_region, r, kind, scaled, vc, xc, inside)
            out = jax.lax.cond(jnp.any(inside), run, lambda o: o, out)
        return out

    values = jax.lax.map(per_chunk, (vs, xs, rs)).reshape(-1)[:n]
    return jnp.zeros_like(x).at[order].set(values).reshape(shape)


def _evaluate(v: jax.Array, x: jax.Array, kind: str, scaled: bool) -> jax.Array:
    """Like ``log_bessel_reference``, through :func:`_dispatch`."""
    if v.size == 0:
        return jnp.zeros_like(x)
    any_negative = jnp.any(v < 0)

    def positive(a, xx, kind_, scaled_):
        if kind == "i" and kind_ == "k":  # K only enters the reflection of negative orders
            return jax.lax.cond(any_negative, lambda: _dispatch(a, xx, "k", scaled_),
                                lambda: jnp.zeros_like(xx))
        return _dispatch(a, xx, kind_, scaled_)

    return assemble(v, x, kind, scaled, positive)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _log_bessel(v: jax.Array, x: jax.Array, kind: str, scaled: bool) -> jax.Array:
    return _evaluate(v, x, kind, scaled)


@_log_bessel.defjvp
def _log_bessel_jvp(kind: str, scaled: bool, primals, tangents):
    v, x = primals
    v_dot, x_dot = tangents
    value, d_dv = jax.jvp(lambda order: _evaluate(order, x, kind, scaled), (v,),
                          (jnp.ones_like(v),))
    if kind == "i":  # I_{v+1} / I_v + v / x (- 1 scaled: the ratio of scaled forms is equal)
        neighbour = _log_bessel(v + 1.0, x, "i", scaled)
        d_dx = jnp.exp(neighbour - value) + v / x - (1.0 if scaled else 0.0)
    else:  # -K_{v-1} / K_v - v / x (+ 1 scaled)
        neighbour = _log_bessel(v - 1.0, x, "k", scaled)
        d_dx = -jnp.exp(neighbour - value) - v / x + (1.0 if scaled else 0.0)
    return value, d_dv * v_dot + d_dx * x_dot


def _public(kind: str, scaled: bool, doc: str):
    def f(v: jax.Array, x: jax.Array) -> jax.Array:
        return _log_bessel(*common_float(v, x), kind, scaled)

    f.__name__ = f.__qualname__ = f"log_{kind}v{'e' if scaled else ''}"
    f.__doc__ = doc
    # Jitted so that eager calls (a notebook, a loop) reuse one compiled program per
    # shape and dtype: run op by op, the dispatch's maps and conds cost ~2.7 s a call.
    # Inside a caller's jit / grad / vmap it is inlined as usual.
    return jax.jit(f)


log_iv = _public("i", False, """``log I_v(x)``; ``v``, ``x`` broadcast, float32 or float64.""")
log_ive = _public("i", True, """``log I_v(x) - x`` (the log of SciPy's ``ive``).""")
log_kv = _public("k", False, """``log K_v(x)``; ``v``, ``x`` broadcast, float32 or float64.""")
log_kve = _public("k", True, """``log K_v(x) + x`` (the log of SciPy's ``kve``).""")
