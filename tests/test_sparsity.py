"""Every N:M transform against a straightforward NumPy reference; gradients; MVUE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.quant import fp8
from sparsejax.sparse_linear import nm_linear
from sparsejax.sparsity import (
    flip_rate,
    mvue24,
    nm_mask,
    soft_threshold,
    sr_ste,
    sste,
    sste_scale,
    ste,
)
from sparsejax.transforms import SpecError, build_spec

PATTERNS = [(1, 4), (2, 4), (4, 8)]
DTYPES = [jnp.float32, jnp.bfloat16]
SHAPES = [(8, 3), (16, 5, 2), (32,)]


# ------------------------------------------------------------------ NumPy references


def np_groups(w: np.ndarray, m: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(-1, m), moved.shape


def np_ungroup(g: np.ndarray, moved_shape, axis: int) -> np.ndarray:
    return np.moveaxis(g.reshape(moved_shape), -1, axis)


def np_mask(w: np.ndarray, n: int, m: int, axis: int = 0) -> np.ndarray:
    groups, shape = np_groups(np.abs(w), m, axis)
    out = np.zeros(groups.shape, bool)
    for r, row in enumerate(groups):
        # stable sort of -|w|: larger first, ties in index order
        out[r, np.argsort(-row, kind="stable")[:n]] = True
    return np_ungroup(out, shape, axis)


def np_soft_threshold(w: np.ndarray, n: int, m: int, axis: int = 0) -> np.ndarray:
    groups, shape = np_groups(w, m, axis)
    out = np.zeros_like(groups)
    for r, row in enumerate(groups):
        tau = np.sort(np.abs(row))[m - n - 1]  # the (m-n)-th smallest magnitude
        out[r] = np.sign(row) * np.maximum(np.abs(row) - tau, 0)
    return np_ungroup(out, shape, axis)


def rand(shape, dtype, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def tolerance(dtype):
    return dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------ masks and S(w)


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nm_mask_matches_reference_and_keeps_exactly_n(n, m, dtype, shape):
    w = rand(shape, dtype)
    mask = nm_mask(w, n, m, axis=0)
    np.testing.assert_array_equal(mask, np_mask(np.asarray(w, np.float32), n, m))
    assert mask.shape == w.shape and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np_groups(np.asarray(mask), m, 0)[0].sum(-1), n)


def test_nm_mask_breaks_ties_towards_lower_index():
    w = jnp.array([1.0, -1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(nm_mask(w, 2, 4), [1, 1, 0, 0, 0, 1, 1, 0])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nm_mask_groups_run_along_the_given_axis(axis):
    w = rand((8, 8), jnp.float32, seed=3)
    np.testing.assert_array_equal(nm_mask(w, 2, 4, axis=axis), np_mask(np.asarray(w), 2, 4, axis))


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_soft_threshold_matches_reference(n, m, dtype, shape):
    w = rand(shape, dtype, seed=1)
    s = soft_threshold(w, n, m)
    assert s.dtype == dtype and s.shape == w.shape
    ref = np_soft_threshold(np.asarray(w, np.float32), n, m)
    np.testing.assert_allclose(np.asarray(s, np.float32), ref, **tolerance(dtype))
    # distinct magnitudes: exactly n non-zeros per group, at the top-n positions
    nz = np_groups(np.asarray(s, np.float32) != 0, m, 0)[0]
    np.testing.assert_array_equal(nz.sum(-1), n)
    np.testing.assert_array_equal(np.asarray(s) != 0, np.asarray(nm_mask(w, n, m)))


def test_soft_threshold_is_continuous_when_the_mask_flips():
    # |w1| crosses |w2| with a tiny step: the hard mask jumps, S(w) barely moves.
    w = jnp.array([0.5000, 0.4999, 0.1, 0.9])
    w2 = w.at[1].set(0.5001)
    assert not np.array_equal(nm_mask(w, 2, 4), nm_mask(w2, 2, 4))
    assert float(jnp.abs(soft_threshold(w2) - soft_threshold(w)).max()) <= 2.1e-4
    hard = lambda v: jnp.where(nm_mask(v), v, 0)
    assert float(jnp.abs(hard(w2) - hard(w)).max()) > 0.49
    # Lipschitz on random perturbations: |S(w+d) - S(w)|_inf <= 2 |d|_inf
    for seed in range(5):
        base = rand((64, 4), jnp.float32, seed)
        delta = 1e-3 * rand((64, 4), jnp.float32, seed + 100)
        change = jnp.abs(soft_threshold(base + delta) - soft_threshold(base)).max()
        assert float(change) <= 2 * float(jnp.abs(delta).max()) + 1e-7


@pytest.mark.parametrize("n, m", PATTERNS)
def test_sste_scale_is_least_squares_fit(n, m):
    w = rand((64, 8), jnp.float32, seed=2)
    s = np_soft_threshold(np.asarray(w), n, m)
    beta = float(sste_scale(w, n, m))
    assert beta == pytest.approx(float((np.asarray(w) * s).sum() / (s * s).sum()), rel=1e-5)
    # the residual |W - beta S|^2 is minimal at beta
    res = lambda b: float(((np.asarray(w) - b * s) ** 2).sum())
    assert res(beta) <= min(res(beta * 0.99), res(beta * 1.01))
    assert beta > 1.0  # S shrinks magnitudes, beta scales them back


@pytest.mark.parametrize("bad", [dict(n=2, m=4, shape=(6, 3)), dict(n=4, m=4, shape=(8,)),
                                 dict(n=0, m=4, shape=(8,))])
def test_invalid_patterns_raise_naming_shape_and_pattern(bad):
    w = jnp.ones(bad["shape"])
    with pytest.raises(ValueError, match=rf"{bad['n']}:{bad['m']}"):
        nm_mask(w, bad["n"], bad["m"])
    with pytest.raises(ValueError, match=r"shape \(|needs 1 <= n < m"):
        soft_threshold(w, bad["n"], bad["m"])


def test_sparsity_specs_validate_and_name_the_field():
    with pytest.raises(SpecError, match="not one of") as err:
        build_spec("sparsity", {"method": "magic"})
    assert err.value.field == "method"
    with pytest.raises(SpecError, match="3:2") as err:
        build_spec("sparsity", {"method": "ste", "n": 3, "m": 2})
    assert err.value.field == "n"


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("n, m", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sste_forward_and_straight_through_gradient(n, m, dtype):
    w = rand((16, 4), dtype, seed=4)
    beta = sste_scale(w, n, m)
    out = sste(w, beta, n, m, 0)
    ref = float(beta) * np_soft_threshold(np.asarray(w, np.float32), n, m)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, **tolerance(dtype))
    g = rand((16, 4), dtype, seed=5)
    grad_w, grad_beta = jax.grad(lambda w, b: jnp.vdot(sste(w, b, n, m, 0), g).real,
                                 argnums=(0, 1))(w, beta)
    np.testing.assert_array_equal(grad_w, g)  # identity: dL/dW := dL/dW_eff
    assert float(grad_beta) == 0.0  # beta is frozen


@pytest.mark.parametrize("n, m", PATTERNS)
def test_ste_forward_and_gradient(n, m):
    w, g = rand((16, 4), jnp.float32, 6), rand((16, 4), jnp.float32, 7)
    np.testing.assert_array_equal(ste(w, n, m, 0), np.asarray(w) * np_mask(np.asarray(w), n, m))
    np.testing.assert_array_equal(jax.grad(lambda w: jnp.vdot(ste(w, n, m, 0), g))(w), g)


@pytest.mark.parametrize("n, m", PATTERNS)
def test_sr_ste_gradient_decays_pruned_weights_only(n, m):
    w, g = rand((16, 4), jnp.float32, 8), rand((16, 4), jnp.float32, 9)
    decay = 2e-4
    mask = np_mask(np.asarray(w), n, m)
    np.testing.assert_array_equal(sr_ste(w, n, m, 0, decay), np.asarray(w) * mask)
    grad = jax.grad(lambda w: jnp.vdot(sr_ste(w, n, m, 0, decay), g))(w)
    expected = np.asarray(g) + decay * (1 - mask) * np.asarray(w)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def test_transforms_jit_and_vmap():
    w = rand((3, 8, 4), jnp.float32, 10)
    batched = jax.jit(jax.vmap(lambda x: soft_threshold(x, 2, 4, 0)))(w)
    for i in range(3):
        np.testing.assert_allclose(batched[i], soft_threshold(w[i]), rtol=1e-6)


def test_flip_rate_counts_changed_mask_entries():
    a = jnp.array([4.0, 3.0, 2.0, 1.0])
    b = jnp.array([1.0, 3.0, 2.0, 4.0])  # mask {0,1} -> {1,3}: 2 of 4 entries change
    assert float(flip_rate(a, b)) == pytest.approx(0.5)
    assert float(flip_rate(a, a)) == 0.0


# ------------------------------------------------------------------ MVUE


def test_mvue_keeps_exactly_two_per_group_and_is_unbiased():
    g = rand((8, 6), jnp.float32, 11).at[0:4, 0].set(0.0)  # an all-zero group too
    keys = jax.random.split(jax.random.key(12), 20000)
    samples = jax.jit(jax.vmap(lambda k: mvue24(g, k, axis=0)))(keys)
    nz = (np.asarray(samples) != 0).reshape(20000, 2, 4, 6).sum(2)
    assert nz[:, 1:, :].min() == 2 and nz.max() == 2  # groups with data keep exactly 2
    np.testing.assert_array_equal(np.asarray(samples)[:, 0:4, 0], 0.0)
    mean = np.asarray(samples).mean(0)
    # Monte Carlo: |mean - g| within 5 standard errors of the estimator, per entry.
    stderr = np.asarray(samples).std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - np.asarray(g)) <= 5 * stderr + 1e-6)


def test_mvue_inclusion_probabilities_match_formula():
    g = jnp.array([[4.0], [2.0], [1.0], [1.0]])
    keys = jax.random.split(jax.random.key(0), 40000)
    kept = np.asarray(jax.vmap(lambda k: mvue24(g, k, 0))(keys) != 0)[..., 0].mean(0)
    a = np.array([4.0, 2.0, 1.0, 1.0])
    s = a.sum()
    p = a / s + np.array([sum(a[j] / s * a[i] / (s - a[j]) for j in range(4) if j != i)
                          for i in range(4)])
    np.testing.assert_allclose(kept, p, atol=0.01)
    assert p.sum() == pytest.approx(2.0)


# ------------------------------------------------------------------ sparse linear op


def test_nm_linear_matches_dense_matmul_and_gradients_without_mvue():
    x, w = rand((2, 6, 8), jnp.float32, 13), rand((8, 5), jnp.float32, 14)
    np.testing.assert_allclose(nm_linear(x, w), x @ w, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    gx, gw = jax.grad(loss(lambda x, w: nm_linear(x, w)), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


def test_nm_linear_mvue_weight_gradient_is_unbiased_and_input_gradient_exact():
    x, w = rand((10, 8), jnp.float32, 15), rand((8, 3), jnp.float32, 16)  # 10 tokens: padded
    loss = lambda x, w, k: jnp.sum(jnp.sin(nm_linear(x, w, k, mvue=True)))
    grad = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0)))
    gx, gw = grad(x, w, jax.random.split(jax.random.key(17), 20000))
    rx, rw = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx[0], rx, rtol=1e-5, atol=1e-5)  # dX stays dense and exact
    stderr = np.asarray(gw).std(0) / np.sqrt(gw.shape[0])
    assert np.all(np.abs(np.asarray(gw).mean(0) - np.asarray(rw)) <= 5 * stderr + 1e-5)
    assert not np.allclose(gw[0], rw)  # a single draw is noisy


@pytest.mark.parametrize("fmt, mantissa_bits", [("e4m3", 3), ("e5m2", 2)])
def test_fp8_rounds_onto_the_grid_with_amax_scaling(fmt, mantissa_bits):
    x = rand((256,), jnp.float32, 18) * 1e-3
    q = fp8(x, fmt)
    assert q.dtype == x.dtype
    assert float(jnp.abs(q).max()) == pytest.approx(float(jnp.abs(x).max()), rel=1e-6)
    big = jnp.abs(x) > 1e-4  # normal range: relative error <= half an ulp
    rel = jnp.abs(q - x)[big] / jnp.abs(x)[big]
    assert float(rel.max()) <= 2.0 ** -(mantissa_bits + 1) + 1e-6
    np.testing.assert_array_equal(fp8(q, fmt), q)  # idempotent
    with pytest.raises(ValueError, match="fp8 format 'e3m4'"):
        fp8(x, "e3m4")


def test_nm_linear_fp8_simulation_is_close_to_full_precision():
    x, w = rand((16, 32), jnp.float32, 19), rand((32, 8), jnp.float32, 20)
    y = nm_linear(x, w, fp8_sim=True)
    rel = float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w))
    assert 1e-4 < rel < 0.08


@pytest.mark.parametrize("dtype", DTYPES)
def test_mvue_along_a_minor_axis_keeps_two_and_preserves_dtype(dtype):
    g = rand((3, 8, 5), dtype, 21)
    out = mvue24(g, jax.random.key(22), axis=1)
    assert out.dtype == dtype and out.shape == g.shape
    nz = (np.asarray(out, np.float32) != 0).reshape(3, 2, 4, 5).sum(2)
    np.testing.assert_array_equal(nz, 2)
    same = np.asarray(out, np.float32) != 0
    assert np.all(np.sign(np.asarray(out, np.float32))[same]
                  == np.sign(np.asarray(g, np.float32))[same])
