"""``sparsejax.numerics``: L-Mul bit-exact against a NumPy reference written from the
formula, its tiled matmul, and the greedy signed-cut decomposition's exact descent."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.numerics import (
    lmul,
    lmul_matmul,
    lmul_offset_bits,
    round_mantissa,
    signed_cut_width,
    signed_cuts,
)

# --------------------------------------------------------------------------- reference


def reference_round(x: float, m: int) -> float:
    """``x`` rounded to ``m`` mantissa bits, to nearest with ties to even (float64)."""
    if x == 0 or not math.isfinite(x):
        return x
    frac, exp = math.frexp(abs(x))  # |x| = frac 2^exp, frac in [0.5, 1)
    significand = np.round(2 * frac * 2.0 ** m) / 2.0 ** m  # 1.f with m bits, half-even
    return math.copysign(significand * 2.0 ** (exp - 1), x)


def reference_lmul(x: float, y: float, m: int) -> float:
    """From the paper's formula: ``(1 + x_m + y_m + 2^-l(m)) 2^(x_e + y_e)``, the mantissa
    sum ``t`` carrying its integer part into the exponent as integer addition does
    (``(1 + frac(t)) 2^(x_e + y_e + floor(t))``), on operands rounded to ``m`` bits; zeros
    signed, float32's range (flush below, inf above)."""
    x, y = reference_round(x, m), reference_round(y, m)
    sign = -1.0 if (math.copysign(1, x) < 0) != (math.copysign(1, y) < 0) else 1.0
    if abs(x) < 2.0 ** -126 or abs(y) < 2.0 ** -126:
        return sign * 0.0
    (fx, ex), (fy, ey) = math.frexp(abs(x)), math.frexp(abs(y))
    xm, ym = 2 * fx - 1, 2 * fy - 1
    t = xm + ym + 2.0 ** -lmul_offset_bits(m)
    e = (ex - 1) + (ey - 1)
    value = (1 + t - math.floor(t)) * 2.0 ** (e + math.floor(t))
    if value >= 2.0 ** 128:
        return sign * math.inf
    if value < 2.0 ** -126:
        return sign * 0.0
    return sign * value


def small_format(m: int, exponents=range(-6, 7)) -> np.ndarray:
    """Every value of an ``m``-bit-mantissa format over ``exponents``, both signs, and 0."""
    mags = [(1 + k / 2 ** m) * 2.0 ** e for e in exponents for k in range(2 ** m)]
    return np.array([0.0, -0.0, *mags, *(-v for v in mags)], np.float32)


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


# --------------------------------------------------------------------------- L-Mul


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_lmul_is_bit_exact_on_every_pair_of_a_small_format(m):
    values = small_format(m)
    x, y = (v.ravel() for v in np.meshgrid(values, values))
    got = np.asarray(jax.jit(lmul, static_argnums=2)(x, y, m))
    expected = np.array([reference_lmul(float(a), float(b), m) for a, b in zip(x, y,
                                                                                strict=True)],
                        np.float32)
    np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("m", [1, 3, 4, 7, 10])
def test_lmul_is_bit_exact_on_random_float32_pairs(m):
    rng = np.random.default_rng(m)
    x = (rng.normal(size=4000) * 10.0 ** rng.uniform(-30, 30, size=4000)).astype(np.float32)
    y = (rng.normal(size=4000) * 10.0 ** rng.uniform(-30, 30, size=4000)).astype(np.float32)
    got = np.asarray(lmul(x, y, m))
    expected = np.array([reference_lmul(float(a), float(b), m) for a, b in zip(x, y,
                                                                                strict=True)],
                        np.float32)
    assert np.isinf(expected).any() and (expected == 0).any()  # both ends of the range
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_lmul_special_values():
    inf, nan = np.inf, np.nan
    x = np.array([0.0, -0.0, inf, inf, -inf, nan, 2.0, 1e-40], np.float32)
    y = np.array([-3.0, -3.0, 2.0, 0.0, 2.0, 1.0, nan, 5.0], np.float32)
    got = np.asarray(lmul(x, y, 3))
    assert bits(got[0]) == bits(-0.0) and bits(got[1]) == bits(0.0)  # signed zeros
    assert got[2] == inf and got[4] == -inf
    assert np.isnan(got[3]) and np.isnan(got[5]) and np.isnan(got[6])
    assert got[7] == 0.0  # subnormal operand flushed


@pytest.mark.parametrize("m", [2, 3, 4, 8])
def test_lmul_by_one_returns_x_within_the_stated_error(m):
    """``|lmul(x, 1) - x| <= (2^-l(m) + 2^-(m+1)) |x|``: the offset plus the rounding of
    ``x`` to ``m`` bits."""
    x = np.random.default_rng(0).normal(size=20_000).astype(np.float32)
    rel = np.abs(np.asarray(lmul(x, np.float32(1.0), m)) - x) / np.abs(x)
    bound = 2.0 ** -lmul_offset_bits(m) + 2.0 ** -(m + 1)
    assert rel.max() <= bound * (1 + 1e-6)
    assert rel.max() > bound / 4  # the bound is not vacuous


def test_round_mantissa_matches_the_reference_with_ties_to_even():
    x = np.array([1.0625, 1.1875, 1.9375, -1.0625, 3.0, 1.03125], np.float32)  # ties at 3 bits
    got = np.asarray(round_mantissa(x, 3))
    np.testing.assert_array_equal(got, [reference_round(float(v), 3) for v in x])
    assert got[0] == 1.0 and got[1] == 1.25 and got[2] == 2.0


@pytest.mark.parametrize(("shape_a", "k_tile"), [((3, 37), 16), ((2, 5, 40), 8), ((4, 7), 32)])
def test_tiled_lmul_matmul_equals_the_elementwise_definition_summed(shape_a, k_tile):
    rng = np.random.default_rng(1)
    a = rng.normal(size=shape_a).astype(np.float32)
    b = rng.normal(size=(shape_a[-1], 6)).astype(np.float32)
    got = np.asarray(lmul_matmul(a, b, 3, k_tile=k_tile))
    products = np.asarray(lmul(a[..., :, None], b, 3), np.float64)  # (..., K, N)
    np.testing.assert_allclose(got, products.sum(axis=-2), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, a @ b, rtol=1e-3)  # it is not the exact product


def test_batched_lmul_matmul_broadcasts_like_matmul():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(2, 3, 5, 20)).astype(np.float32)
    b = rng.normal(size=(2, 1, 20, 4)).astype(np.float32)
    got = np.asarray(lmul_matmul(a, b, 4, k_tile=8))
    assert got.shape == (2, 3, 5, 4)
    products = np.asarray(lmul(a[..., :, :, None], b[..., None, :, :], 4), np.float64)
    np.testing.assert_allclose(got, products.sum(axis=-2), rtol=1e-5, atol=1e-5)
    vector = np.asarray(lmul_matmul(a[0, 0, 0], b[0, 0], 4))
    np.testing.assert_allclose(vector, got[0, 0, 0], rtol=1e-6)


# --------------------------------------------------------------------------- signed cuts


@pytest.mark.parametrize("shape", [(48, 32), (20, 70)])
def test_each_signed_cut_lowers_the_residual_by_exactly_its_cut_squared_over_mn(shape):
    m, n = shape
    a = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    cuts = signed_cuts(jnp.asarray(a), 12, key=jax.random.key(3))
    residual = a.astype(np.float64)
    for j in range(12):
        s, t, c = (np.asarray(v, np.float64) for v in (cuts.s[:, j], cuts.t[:, j], cuts.c[j]))
        assert set(np.unique(s)) <= {-1.0, 1.0} and set(np.unique(t)) <= {-1.0, 1.0}
        value = s @ residual @ t
        np.testing.assert_allclose(float(cuts.cut[j]), value, rtol=1e-4)
        np.testing.assert_allclose(c, value / (m * n), rtol=1e-4)
        before = np.sum(residual ** 2)
        residual = residual - c * np.outer(s, t)
        np.testing.assert_allclose(before - np.sum(residual ** 2), value ** 2 / (m * n),
                                   rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cuts.dense()), a - residual, atol=1e-4)


def test_a_rank_one_sign_matrix_is_recovered_exactly_in_one_term():
    rng = np.random.default_rng(4)
    s, t = np.sign(rng.normal(size=30)), np.sign(rng.normal(size=50))
    a = (-1.7 * np.outer(s, t)).astype(np.float32)
    cuts = signed_cuts(jnp.asarray(a), 1, key=jax.random.key(5))
    np.testing.assert_allclose(np.asarray(cuts.dense()), a, rtol=1e-6)
    assert float(cuts.c[0]) == pytest.approx(1.7, rel=1e-6)


def test_more_terms_never_raise_the_error_and_width_follows_the_bit_budget():
    a = jnp.asarray(np.random.default_rng(6).normal(size=(64, 64)), jnp.float32)
    cuts = signed_cuts(a, 40)
    terms = np.asarray(cuts.c)[:, None, None] * np.einsum(
        "iw,jw->wij", np.asarray(cuts.s), np.asarray(cuts.t))
    partial = np.concatenate([np.zeros((1, 64, 64)), np.cumsum(terms, axis=0)])
    errors = np.linalg.norm(np.asarray(a)[None] - partial, axis=(1, 2))
    assert all(e1 <= e0 + 1e-4 for e0, e1 in itertools.pairwise(errors))
    assert signed_cut_width(128, 512, 1.0) == 128 * 512 // (128 + 512 + 16)
