"""Logarithms of the modified Bessel functions I_v(x) and K_v(x): the elementwise algorithm,
a Pallas kernel that runs it, and the pure-JAX reference.

Algorithm (docs/methods.md §6; Plesner, Sorensen, Hauberg, ICS 2024): everything in log space,
one of three formulas per point, chosen by :func:`region_of` (``v >= 0``, ``x > 0``):

* ``HANKEL`` (``x > 30`` and ``v^2 < 2x``): the large-argument expansion (DLMF 10.40.1-2),
  20 terms, ``c_k = c_{k-1} (mu - (2k-1)^2) / (8 k x)`` with ``mu = 4 v^2`` (alternating
  signs for I). Under ``v^2 < 2x`` term 20 is below ``1/20! ~ 4e-19`` of the first (this
  is the guard of an independent port of the paper's code; it replaces the reference's 3-term
  branch, which only saves time).
* ``UNIFORM`` (else if ``v > 12.7``, or ``x > 19.69`` and ``v > 0.7``): the Debye
  expansion (DLMF 10.41.3-4) with ``u_0 .. u_13``; the polynomials are generated exactly
  (rational arithmetic) from DLMF 10.41.9 at import, not typed in. In float32, near the
  zero of ``eta`` (x / v ~ 0.66) ``v * eta`` comes from a Taylor series about that zero
  with ``x / v - z0`` formed exactly (:func:`_eta_near_root`), else it cancels.
* ``SMALL`` (the rest, so ``x <= 30`` and ``v <= 12.7``): for I the power series
  ``I_v(x) = (x/2)^v / Gamma(v+1) sum_k (x^2/4)^k / (k! (v+1)_k)``, 64 terms summed
  backwards (Horner) from term ratios, so no lgamma per term; for K, ``K_mu`` and
  ``K_{mu+1}`` at ``mu = v - round(v)`` from Temme's series (small x) or Steed's continued
  fraction, then the forward recurrence in the order (:func:`_small_k`; the paper
  integrates Rothwell's representation numerically instead, which costs hundreds of
  transcendentals a point and needs care as x -> 0).

The series' prefactor ``log((x/2)^v / Gamma(v+1))`` is formed without lgamma (Triton has
none) and without cancelling ``v log(x/2)`` against ``lgamma(v+1)``: a product of
``(x/2) / (f + k)`` over ``k = 1..round(v)`` and the Taylor series of ``1 / Gamma(1 + f)``
at ``f = v - round(v)`` (:func:`_log_power_over_gamma`). Negative orders use
``I_{-v} = I_v + (2/pi) sin(pi v) K_v`` (NaN where that is negative) and ``K_{-v} = K_v``.
Edge cases: ``x = 0`` gives ``log I_0 = 0``, ``log I_v = -inf`` (v > 0, or a negative
integer), ``+inf`` for ``-1 < v < 0`` (generally: where ``1/Gamma(v+1) > 0``, NaN where
negative), ``log K = +inf``; ``x < 0`` gives NaN; NaN in, NaN out; ``x = inf`` gives
``log I = inf``, ``log K = -inf`` and ``-inf`` for both scaled forms; ``|v| = inf`` (x
finite) gives ``log I = -inf``, ``log K = inf``.

``log_bessel(v, x, kind, scaled)`` is an elementwise Pallas kernel: each block computes
all three formulas and selects (a GPU/TPU lane cannot skip work its neighbours need);
``sparsejax.special`` is the XLA version that evaluates each formula only on the points
that need it, and adds derivatives. ``log_bessel_reference`` is the same elementwise
algorithm in plain ``jax.numpy``: the kernel's reference in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from collections.abc import Callable
from fractions import Fraction

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from sparsejax.kernels.compiler_params import tpu_params, triton_params

__all__ = ["HANKEL", "KINDS", "SMALL", "SMALL_K_STEED", "UNIFORM", "BlockSize", "assemble",
           "common_float", "evaluate_region", "log_bessel", "log_bessel_reference",
           "log_bessel_region",
           "region_of", "regions", "safe_point"]

HANKEL, UNIFORM, SMALL = 0, 1, 2
# K only: the small-region points above TEMME_X, served by Steed's continued fraction (SMALL
# K points below it take Temme's series), so that each costs one of the two.
SMALL_K_STEED = 3
KINDS = ("i", "k")
HANKEL_TERMS = 20
DEBYE_TERMS = 14  # u_0 .. u_13
SERIES_TERMS = 64
TEMME_TERMS = 18  # x <= 2: the last term is below 1e-17 of the sum
# K at small x: Temme's series up to TEMME_X, Steed's continued fraction (STEED_TERMS steps)
# above. Temme's sum cancels like e^(2x) eps, so float32 switches earlier; the continued
# fraction converges algebraically (float64 at x = 2: 1e-10 after 32 steps, 2e-14 after 64,
# 1e-15 after 96; float32 at x = 1: 3e-9 after 48).
TEMME_X = {"float32": 1.0, "float64": 2.0}
STEED_TERMS = {"float32": 48, "float64": 96}
MAX_ORDER_STEPS = 13  # v <= 12.7 in the small region: K_{mu+n}, n = round(v) <= 13
# The reference implementation's uniform-expansion boundaries (docs/methods.md §6).
UNIFORM_V, UNIFORM_X, UNIFORM_V_MIN = 12.7, 19.69, 0.7
HANKEL_X = 30.0
_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- coefficients


def _debye_polynomials(count: int) -> list[list[Fraction]]:
    """Coefficients (ascending powers of t) of the Debye polynomials u_0 .. u_{count-1}:
    ``u_{k+1}(t) = t^2 (1 - t^2) u_k'(t) / 2 + (1/8) int_0^t (1 - 5 s^2) u_k(s) ds``
    (DLMF 10.41.9), in exact rational arithmetic."""
    polys = [[Fraction(1)]]
    for _ in range(count - 1):
        u = polys[-1]
        nxt = [Fraction(0)] * (len(u) + 3)
        for p, c in enumerate(u):
            if p:  # t^2 (1 - t^2) / 2 * p c t^(p-1)
                nxt[p + 1] += c * p / 2
                nxt[p + 3] -= c * p / 2
            nxt[p + 1] += c / (8 * (p + 1))  # (1/8) int (1 - 5 s^2) c s^p
            nxt[p + 3] -= 5 * c / (8 * (p + 3))
        polys.append(nxt)
    return polys


_DEBYE = [[float(c) for c in poly] for poly in _debye_polynomials(DEBYE_TERMS)]
_EULER_GAMMA = 0.57721566490153286


def _zeta(s: int, head_terms: int = 40) -> float:
    """Riemann zeta(s), s >= 2, by Euler-Maclaurin after ``head_terms`` terms (B_2..B_10;
    the next term is below 1e-17 of the value)."""
    bernoulli = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66)
    n = head_terms
    total = math.fsum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n ** -s
    rising = s  # s (s + 1) ... (s + 2j)
    for j, b in enumerate(bernoulli):
        total += b / math.factorial(2 * j + 2) * rising * n ** (-s - 2 * j - 1)
        rising *= (s + 2 * j + 1) * (s + 2 * j + 2)
    return total


def _reciprocal_gamma_coefficients(count: int) -> list[float]:
    """Taylor coefficients ``c_j`` of ``1 / Gamma(1 + z) = sum_j c_j z^j`` (DLMF 5.7.1),
    from ``log Gamma(1 + z) = -gamma z + sum_k (-1)^k zeta(k) z^k / k`` (DLMF 5.7.3) by the
    power-series exponential ``c_n = (1/n) sum_k k g_k c_{n-k}``."""
    g = [0.0, _EULER_GAMMA] + [-((-1) ** k) * _zeta(k) / k for k in range(2, count)]
    c = [1.0]
    for n in range(1, count):
        c.append(math.fsum(k * g[k] * c[n - k] for k in range(1, n + 1)) / n)
    return c


_RECIPROCAL_GAMMA = _reciprocal_gamma_coefficients(24)  # |c_23| 0.5^23 < 1e-22


def _eta_root() -> float:
    """The zero of ``eta(z) = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2)))`` (0.6627...,
    the Laplace limit constant), by Newton's method with ``eta' = sqrt(1 + z^2) / z``."""
    z = 0.66
    for _ in range(20):
        root = math.sqrt(1.0 + z * z)
        z -= (root + math.log(z / (1.0 + root))) / (root / z)
    return z


def _eta_taylor(z0: float, count: int) -> list[float]:
    """Taylor coefficients ``e_1 .. e_count`` of ``eta(z0 + t) - eta(z0)`` from
    ``eta' = sqrt(1 + z^2) / z``: the power series of ``sqrt(1 + (z0 + t)^2)`` times that of
    ``1 / (z0 + t)``, integrated term by term (radius of convergence z0)."""
    a = [1.0 + z0 * z0, 2.0 * z0, 1.0] + [0.0] * count  # 1 + (z0 + t)^2
    root = [math.sqrt(a[0])]
    for n in range(1, count):
        root.append((a[n] - math.fsum(root[k] * root[n - k] for k in range(1, n)))
                    / (2.0 * root[0]))
    inverse = [(-1.0) ** k / z0 ** (k + 1) for k in range(count)]
    derivative = [math.fsum(root[k] * inverse[n - k] for k in range(n + 1))
                  for n in range(count)]
    return [derivative[k - 1] / k for k in range(1, count + 1)]


ETA_ROOT = _eta_root()
# float32 only: within ETA_WINDOW of the root the uniform expansion's v * eta is taken from
# this series in t = z - ETA_ROOT (t / ETA_ROOT <= 0.38: 24 terms reach 1e-10).
ETA_WINDOW = 0.25
_ETA_SERIES = _eta_taylor(ETA_ROOT, 24)
_ETA_ROOT_HIGH = float(struct.unpack("f", struct.pack("f", ETA_ROOT))[0])  # float32 head
_ETA_ROOT_LOW = ETA_ROOT - _ETA_ROOT_HIGH


# --------------------------------------------------------------------------- pieces


def _round(y: jax.Array) -> jax.Array:
    """Nearest integer (halves up) from floor: Triton has no round."""
    return jnp.floor(y + 0.5)


def _hankel(v, x, kind: str, scaled: bool):
    """DLMF 10.40.1 (I) / 10.40.2 (K), ``HANKEL_TERMS`` terms."""
    mu = 4.0 * v * v
    sign = -1.0 if kind == "i" else 1.0
    term = jnp.ones_like(x)
    total = jnp.ones_like(x)
    for k in range(1, HANKEL_TERMS):
        term = term * (sign * (mu - (2 * k - 1) ** 2)) / (8.0 * k * x)
        total = total + term
    if kind == "i":
        return (0.0 if scaled else x) - 0.5 * (_LOG_2PI + jnp.log(x)) + jnp.log(total)
    return 0.5 * (math.log(math.pi / 2) - jnp.log(x)) - (0.0 if scaled else x) + jnp.log(total)


def _two_product(a, b):
    """``a * b = high + low`` exactly in float32 (Dekker's split into 12-bit halves)."""
    def split(y):
        c = 4097.0 * y
        high = c - (c - y)
        return high, y - high

    high = a * b
    ah, al = split(a)
    bh, bl = split(b)
    low = ((ah * bh - high) + ah * bl + al * bh) + al * bl
    return high, low


def _eta_near_root(v, x, z, eta):
    """float32 ``eta(x / v)`` with relative accuracy near its zero ``ETA_ROOT``, where
    ``root + log_ratio`` cancels (terms ~1.2, eta ~0) and even the rounding of ``z = x / v``
    alone costs ``v * 1.2 * 6e-8`` absolute in ``v eta`` (7e-4 at v = 1e4: 7e-6 relative
    on log I). Within ``ETA_WINDOW``: ``t = z - ETA_ROOT = (x - ETA_ROOT v) / v`` with the
    product split exactly (x - high is exact there, Sterbenz) and ``eta`` from its Taylor
    series in ``t``; elsewhere ``eta`` as given."""
    root_high, root_low = _ETA_ROOT_HIGH, _ETA_ROOT_LOW
    near = jnp.abs(z - root_high) < ETA_WINDOW
    vs = jnp.where(near, v, 1.0)
    xs = jnp.where(near, x, root_high)  # safe operands outside (no inf / NaN under grad)
    high, low = _two_product(vs, jnp.full_like(vs, root_high))
    t = (((xs - high) - low) - root_low * vs) / vs
    return jnp.where(near, t * _poly(_ETA_SERIES, t), eta)


def _uniform(v, x, kind: str, scaled: bool):
    """DLMF 10.41.3 (I) / 10.41.4 (K) with ``u_0 .. u_13``; ``v > 0``."""
    z = x / v
    root = jnp.sqrt(1.0 + z * z)
    t = 1.0 / root
    # eta = root + log(z / (1 + root)); the scaled forms need eta - z (log I - x =
    # ... + v (eta - z), log K + x = ... - v (eta - z)), with root - z = 1 / (root + z)
    # computed without cancellation.
    log_ratio = jnp.log(z) - jnp.log1p(root)
    eta = (1.0 / (root + z) if scaled else root) + log_ratio
    if not scaled and jnp.dtype(x.dtype) == jnp.float32:
        eta = _eta_near_root(v, x, z, eta)
    inv_v = 1.0 / v
    total = jnp.zeros_like(x)
    for k in reversed(range(DEBYE_TERMS)):
        coeffs = _DEBYE[k]
        u = jnp.full_like(t, coeffs[-1])
        for c in reversed(coeffs[:-1]):
            u = u * t + c
        sign = -1.0 if (kind == "k" and k % 2) else 1.0
        total = total * inv_v + sign * u
    common = -0.25 * jnp.log1p(z * z) + jnp.log(total)
    if kind == "i":
        return -0.5 * (_LOG_2PI + jnp.log(v)) + v * eta + common
    # K: -v eta, and the scaled form adds x: -v (eta - z)
    return 0.5 * (math.log(math.pi / 2) - jnp.log(v)) - v * eta + common


def _log_power_over_gamma(v: jax.Array, x: jax.Array) -> jax.Array:
    """``log((x/2)^v / Gamma(v + 1))`` for ``0 <= v <= MAX_ORDER_STEPS + 1/2`` (the series
    region), with no lgamma primitive and no cancellation between ``v log(x/2)`` and
    ``lgamma(v + 1)`` (in float32 those two are ~20 where the result is ~1, and the
    difference of their roundings was a 3.6e-6 error).

    With ``n = round(v)``, ``f = v - n`` (``|f| <= 1/2``):
    ``f log(x/2) - lgamma(1 + f) + log P``, ``P = prod_{k=1..n} (x/2) / (f + k)``, where
    ``-lgamma(1 + f)`` is the log of the Taylor series of ``1 / Gamma(1 + f)``. For
    ``x >= 2`` the factors of ``P`` lie in [1/13.5, 20], so ``P`` is formed as a product and
    its log taken once; below, ``n log(x/2)`` and ``-log prod (f + k)`` are both negative and
    are added as logs (``P`` itself could underflow)."""
    n = _round(v)
    f = v - n
    half = 0.5 * x
    ratios = jnp.ones_like(x)
    rising = jnp.ones_like(x)
    for k in range(1, MAX_ORDER_STEPS + 1):
        take = n >= k
        ratios = jnp.where(take, ratios * (half / (f + k)), ratios)
        rising = jnp.where(take, rising * (f + k), rising)
    log_half = jnp.log(half)
    large = x >= 2.0
    log_p = jnp.where(large, jnp.log(jnp.where(large, ratios, 1.0)),
                      n * log_half - jnp.log(rising))
    return f * log_half + jnp.log(_poly(_RECIPROCAL_GAMMA, f)) + log_p


def _series_i(v, x, scaled: bool):
    """``log I_v(x)`` from the power series (DLMF 10.25.2), ``SERIES_TERMS`` terms."""
    q = 0.25 * x * x

    # k = SERIES_TERMS - 1, ..., 1 (a loop keeps the graph small: fast compiles). The loops
    # here carry their counters as floats and leave the loop index alone: under
    # jax_enable_x64 the index is int64, whose arithmetic Mosaic (TPU) cannot lower.
    def backward_step(_, carry):
        total, k = carry
        return 1.0 + total * q / (k * (k + v)), k - 1.0

    total, _ = jax.lax.fori_loop(0, SERIES_TERMS - 1, backward_step,
                                 (jnp.ones_like(x), jnp.full_like(x, SERIES_TERMS - 1)))
    value = _log_power_over_gamma(v, x) + jnp.log(total)
    return value - x if scaled else value


def _poly(coeffs, z):
    """``sum_j coeffs[j] z^j`` by Horner."""
    total = jnp.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        total = total * z + c
    return total


def _temme_k(mu, x):
    """``(log K_mu(x), x K_{mu+1}(x) / (2 K_mu(x)))`` for ``|mu| <= 1/2``,
    ``0 < x <= TEMME_X``: Temme's series (Temme 1975, J. Comput. Phys. 19; the form of
    Numerical Recipes' ``bessik``), ``TEMME_TERMS`` terms. The gamma-function combinations
    ``Gamma_1 = (1/Gamma(1-mu) - 1/Gamma(1+mu)) / (2 mu)`` and
    ``Gamma_2 = (1/Gamma(1-mu) + 1/Gamma(1+mu)) / 2`` are the odd and even parts of the
    Taylor series of ``1/Gamma(1+z)``, so nothing cancels at ``mu = 0``."""
    half = 0.5 * x
    log_2_over_x = -jnp.log(half)
    e = mu * log_2_over_x
    at_zero = mu == 0.0
    pi_mu = jnp.where(at_zero, 1.0, math.pi * mu)  # safe operands: no 0/0 under reverse mode
    fact = jnp.where(at_zero, 1.0, pi_mu / jnp.sin(pi_mu))
    small_e = jnp.abs(e) < 0.5
    e_safe = jnp.where(small_e, 1.0, e)
    exp_e, exp_minus_e = jnp.exp(e), jnp.exp(-e)
    sinh_e_over_e = jnp.where(  # sinh(e)/e: series (terms to e^16/17!) where exp would cancel
        small_e, _poly([1.0 / math.factorial(2 * j + 1) for j in range(9)], e * e),
        0.5 * (exp_e - exp_minus_e) / e_safe)
    cosh_e = 0.5 * (exp_e + exp_minus_e)
    mu2 = mu * mu
    gamma_1 = -_poly(_RECIPROCAL_GAMMA[1::2], mu2)
    gamma_2 = _poly(_RECIPROCAL_GAMMA[0::2], mu2)
    recip_gamma_plus = gamma_2 - mu * gamma_1  # 1 / Gamma(1 + mu)
    recip_gamma_minus = gamma_2 + mu * gamma_1  # 1 / Gamma(1 - mu)
    f = fact * (gamma_1 * cosh_e + gamma_2 * sinh_e_over_e * log_2_over_x)
    p = 0.5 * exp_e / recip_gamma_plus  # (x/2)^-mu Gamma(1+mu) / 2
    q = 0.5 * exp_minus_e / recip_gamma_minus  # (x/2)^mu Gamma(1-mu) / 2
    quarter_x2 = half * half

    def term(_, carry):  # a loop, not unrolled: the graph stays small under jvp / grad
        f, p, q, c, total, total_1, i = carry  # i = 1, 2, ... as a float (see _series_i)
        f = (i * f + p + q) / ((i - mu) * (i + mu))
        c = c * quarter_x2 / i
        p = p / (i - mu)
        q = q / (i + mu)
        return f, p, q, c, total + c * f, total_1 + c * (p - i * f), i + 1.0

    *_, total, total_1, _ = jax.lax.fori_loop(
        1, TEMME_TERMS, term, (f, p, q, jnp.ones_like(x), f, p, jnp.ones_like(x)))
    return jnp.log(total), total_1 / total


def _steed_k(mu, x):
    """``(log K_mu(x) + x, x K_{mu+1}(x) / (2 K_mu(x)))`` for ``|mu| <= 1/2``, ``x > TEMME_X``:
    Steed's algorithm for the continued fraction CF2 (Thompson and Barnett 1987, the form
    of Numerical Recipes' ``bessik``), ``STEED_TERMS`` steps."""
    b = 2.0 * (1.0 + x)
    d = 1.0 / b
    h = d
    delta_h = d
    # Steed's q_k enter only as c_k q_k, and c_k grows like k! (float32 overflow by k ~ 34):
    # carry u1 = c_{k-1} q_{k-1} and u2 = c_{k-1} q_k instead.
    a1 = 0.25 - mu * mu
    a = -a1 * jnp.ones_like(x)

    def step(_, carry):
        a, b, d, h, delta_h, u1, u2, q, s, i = carry  # i = 1, 2, ... as a float
        a = a - 2.0 * i
        increment = (b * u2 - u1) / (i + 1.0)  # c_i q_{i+1}
        u1, u2 = -a * u2 / (i + 1.0), increment
        q = q + increment
        b = b + 2.0
        d = 1.0 / (b + a * d)
        delta_h = (b * d - 1.0) * delta_h
        return a, b, d, h + delta_h, delta_h, u1, u2, q, s + q * delta_h, i + 1.0

    q = a1 * jnp.ones_like(x)
    init = (a, b, d, h, delta_h, jnp.zeros_like(x), q, q, 1.0 + q * delta_h, jnp.ones_like(x))
    _, _, _, h, _, _, _, _, s, _ = jax.lax.fori_loop(
        1, STEED_TERMS[jnp.dtype(x.dtype).name], step, init)
    h = a1 * h
    log_k_scaled = 0.5 * (math.log(math.pi / 2) - jnp.log(x)) - jnp.log(s)
    return log_k_scaled, 0.5 * (mu + x + 0.5 - h)


def _small_k(v, x, scaled: bool, method: str):
    """``log K_v(x)`` for ``0 <= v <= 12.7``, ``0 < x <= 30``: ``K_mu`` and ``K_{mu+1}``
    at ``mu = v - round(v)`` from Temme's series (``method="temme"``, for ``x <= TEMME_X``)
    or Steed's continued fraction (``"steed"``, above), then the forward recurrence
    ``K_{a+1} = K_{a-1} + (2a/x) K_a`` (stable for K) carried as
    ``s_k = x K_{mu+k+1} / (2 K_{mu+k}) = x^2 / (4 s_{k-1}) + mu + k``, so
    ``log K_v = log K_mu + n log(2/x) + log prod_k s_k`` never overflows.

    The paper integrates Rothwell's representation numerically instead; an earlier version
    here used a 128-node trapezoidal rule, which lost accuracy below x ~ 1e-15 (the
    integrand's support grows like log(1/x)) and cost ~500 transcendentals a point."""
    n = _round(v)
    mu = v - n
    if method == "temme":
        log_k_mu, ratio = _temme_k(mu, x)
        if scaled:
            log_k_mu = log_k_mu + x
    else:
        log_k_mu, ratio = _steed_k(mu, x)
        if not scaled:
            log_k_mu = log_k_mu - x
    quarter_x2 = 0.25 * x * x
    product = jnp.ones_like(x)
    for k in range(MAX_ORDER_STEPS):
        product = product * jnp.where(k < n, ratio, 1.0)
        ratio = quarter_x2 / ratio + (mu + (k + 1))
    return log_k_mu + n * (math.log(2.0) - jnp.log(x)) + jnp.log(product)


def regions(kind: str) -> tuple[int, ...]:
    """The formulas :func:`region_of` chooses among for ``kind``."""
    return (HANKEL, UNIFORM, SMALL) + ((SMALL_K_STEED,) if kind == "k" else ())


def region_of(v: jax.Array, x: jax.Array, kind: str = "i") -> jax.Array:
    """Which formula serves ``(v, x)`` (``v >= 0``, ``x > 0``): ``HANKEL``, ``UNIFORM`` or
    ``SMALL`` (for K, ``SMALL`` above ``TEMME_X`` is ``SMALL_K_STEED``), as int32."""
    hankel = (x > HANKEL_X) & (v * v < 2.0 * x)
    uniform = (v > UNIFORM_V) | ((x > UNIFORM_X) & (v > UNIFORM_V_MIN))
    small = SMALL
    if kind == "k":
        small = jnp.where(x > TEMME_X[jnp.dtype(x.dtype).name], SMALL_K_STEED, SMALL)
    return jnp.where(hankel, HANKEL, jnp.where(uniform, UNIFORM, small)).astype(jnp.int32)


def safe_point(region: int) -> tuple[float, float]:
    """A ``(v, x)`` inside ``region``: what lanes that belong elsewhere compute there."""
    return {HANKEL: (1.0, 100.0), UNIFORM: (20.0, 20.0), SMALL: (1.0, 1.0),
            SMALL_K_STEED: (1.0, 10.0)}[region]


def log_bessel_region(region: int, kind: str, scaled: bool
                      ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The formula of ``region`` as an elementwise ``(v, x) -> log value`` (``v >= 0``,
    ``x > 0``, both inside the region)."""
    if region == HANKEL:
        return lambda v, x: _hankel(v, x, kind, scaled)
    if region == UNIFORM:
        return lambda v, x: _uniform(v, x, kind, scaled)
    if kind == "i":
        return lambda v, x: _series_i(v, x, scaled)
    method = "temme" if region == SMALL else "steed"
    return lambda v, x: _small_k(v, x, scaled, method)


def evaluate_region(region: int, kind: str, scaled: bool, v: jax.Array, x: jax.Array,
                    inside: jax.Array, out: jax.Array) -> jax.Array:
    """``out`` with the points ``inside`` set to the formula of ``region``; the other lanes
    compute at :func:`safe_point` (no inf / NaN that reverse mode could pick up)."""
    sv, sx = safe_point(region)
    value = log_bessel_region(region, kind, scaled)(jnp.where(inside, v, sv),
                                                    jnp.where(inside, x, sx))
    return jnp.where(inside, value, out)


def _positive_order_select(v, x, kind: str, scaled: bool):
    """Every formula of ``kind`` with sanitised inputs, then a select (v >= 0, x > 0
    finite)."""
    region = region_of(v, x, kind)
    out = jnp.zeros_like(x)
    for r in regions(kind):
        out = evaluate_region(r, kind, scaled, v, x, region == r, out)
    return out


# --------------------------------------------------------------------------- assembly


def _sin_pi(v):
    """``sin(pi v)``, exactly 0 at integers."""
    r = v - 2.0 * _round(0.5 * v)  # in [-1, 1]
    return jnp.where(r == jnp.floor(r), 0.0, jnp.sin(math.pi * r))


def assemble(v: jax.Array, x: jax.Array, kind: str, scaled: bool,
             positive: Callable[[jax.Array, jax.Array, str, bool], jax.Array]) -> jax.Array:
    """The full function from ``positive(a, x, kind, scaled)``, which evaluates ``a >= 0``,
    ``x > 0`` finite: negative orders (reflection) and the edge cases of the module
    docstring. ``v`` and ``x`` are broadcast arrays of one float dtype."""
    a = jnp.abs(v)
    interior = (x > 0) & jnp.isfinite(x) & jnp.isfinite(a)
    a_s, x_s = jnp.where(interior, a, 1.0), jnp.where(interior, x, 1.0)
    value = positive(a_s, x_s, kind, scaled)
    if kind == "i":
        s = _sin_pi(a_s)
        log_k = positive(a_s, x_s, "k", scaled)
        if scaled:  # log K - log I in scaled forms carries an extra -2x
            log_k = log_k - 2.0 * x_s
        b = jnp.log(2.0 / math.pi * jnp.maximum(jnp.abs(s), 1e-300)) + log_k
        plus = jnp.logaddexp(value, b)
        # log(I - |term|), defined where the term is smaller; elsewhere a dummy argument,
        # so that reverse-mode zeros of the unselected branch never meet log1p(-1) = -inf
        below = b < value
        gap = jnp.where(below, b - value, -1.0)
        minus = jnp.where(below, value + jnp.log1p(-jnp.exp(gap)), jnp.nan)
        reflected = jnp.where(s > 0, plus, jnp.where(s < 0, minus, value))
        value = jnp.where(v < 0, reflected, value)
    # edge cases
    inf = math.inf
    if kind == "i":
        y = v + 1.0  # sign of 1 / Gamma(v + 1) decides I_v(0+) for negative non-integer v
        floor_y = jnp.floor(y)
        gamma_positive = (y > 0) | (floor_y - 2.0 * jnp.floor(0.5 * floor_y) == 0)
        negative_fraction = (v < 0) & (_sin_pi(v) != 0)
        at_zero = jnp.where(v == 0, 0.0, jnp.where(negative_fraction,
                                                   jnp.where(gamma_positive, inf, jnp.nan),
                                                   -inf))
        at_inf = -inf if scaled else inf
        order_inf = -inf
    else:
        at_zero, at_inf, order_inf = inf, -inf, inf
    value = jnp.where(x == 0, at_zero, value)
    value = jnp.where(jnp.isposinf(x) & jnp.isfinite(v), at_inf, value)
    value = jnp.where(jnp.isinf(v) & jnp.isfinite(x) & (x > 0), order_inf, value)
    bad = (x < 0) | jnp.isnan(x) | jnp.isnan(v) | (jnp.isinf(v) & jnp.isinf(x))
    return jnp.where(bad, jnp.nan, value)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind '{kind}' is not one of {'|'.join(KINDS)}")


def common_float(v, x) -> tuple[jax.Array, jax.Array]:
    """``v`` and ``x`` broadcast to one float dtype: theirs (Python scalars take JAX's
    default float), float32 for half precision and non-float inputs."""
    dtype = jnp.result_type(v, x)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    if jnp.dtype(dtype).itemsize < 4:
        dtype = jnp.float32
    v, x = jnp.broadcast_arrays(jnp.asarray(v, dtype), jnp.asarray(x, dtype))
    return v, x


def log_bessel_reference(v: jax.Array, x: jax.Array, kind: str = "i", scaled: bool = False
                         ) -> jax.Array:
    """``log I_v(x)`` (``kind="i"``) or ``log K_v(x)`` (``"k"``); ``scaled`` gives
    ``log I_v(x) - x`` / ``log K_v(x) + x``. Broadcasts ``v`` and ``x``; float32 or
    float64 (other dtypes compute in float32). Every formula is computed for every point
    (plain ``jax.numpy``): the kernel's reference."""
    _check_kind(kind)
    v, x = common_float(v, x)
    return assemble(v, x, kind, scaled, _positive_order_select)


# --------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class BlockSize:
    """Elements per kernel program: ``rows x 128`` lanes (TPU tiles need ``rows`` to be a
    multiple of 8)."""

    rows: int = 8

    def __post_init__(self):
        if self.rows <= 0 or self.rows % 8:
            raise ValueError(f"BlockSize.rows must be a positive multiple of 8, got {self.rows}")


LANES = 128


def _kernel(v_ref, x_ref, o_ref, *, kind: str, scaled: bool):
    o_ref[...] = assemble(v_ref[...], x_ref[...], kind, scaled, _positive_order_select)


def _platform(platform: str | None) -> str:
    return platform or jax.default_backend()


def log_bessel(v: jax.Array, x: jax.Array, kind: str = "i", scaled: bool = False, *,
               block_size: BlockSize | None = None, interpret: bool | None = None,
               platform: str | None = None) -> jax.Array:
    """The Pallas kernel: same values as :func:`log_bessel_reference` (same algorithm).

    Inputs are broadcast, flattened and padded to ``(rows, 128)`` blocks; each program
    computes one block. ``interpret=None`` interprets on CPU. ``platform`` (``cuda`` |
    ``tpu``) picks the compiler parameters when lowering for another backend (e.g. for
    ``jax.export``). Float32 everywhere; float64 where the backend has it (GPU, CPU
    interpret; not TPU). No derivatives: use ``sparsejax.special`` to differentiate.
    """
    _check_kind(kind)
    block_size = block_size or BlockSize()
    v, x = common_float(v, x)
    shape = v.shape
    size = max(v.size, 1)
    per_block = block_size.rows * LANES
    blocks = -(-size // per_block)
    padded = blocks * per_block

    def flat(a, fill):
        a = a.reshape(-1)
        return jnp.pad(a, (0, padded - a.size), constant_values=fill).reshape(-1, LANES)

    vf, xf = flat(v, 1.0), flat(x, 1.0)
    platform = _platform(platform)
    if interpret is None:
        interpret = platform == "cpu"
    spec = pl.BlockSpec((block_size.rows, LANES), lambda i: (i, 0))
    params = None
    if not interpret:
        if platform in ("cuda", "gpu", "rocm"):
            params = triton_params(num_stages=1)
        elif platform == "tpu":
            params = tpu_params("parallel")
    out = pl.pallas_call(
        functools.partial(_kernel, kind=kind, scaled=scaled),
        grid=(blocks,), in_specs=[spec, spec], out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(vf.shape, vf.dtype),
        compiler_params=params, interpret=interpret)(vf, xf)
    return out.reshape(-1)[: v.size].reshape(shape)

