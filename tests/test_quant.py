"""The low-precision transforms of ``sparsejax.quant`` against NumPy float64 references:
the denoising affine transform (closed-form ridge fit, limits, gradients through the
corrective path, ragged blocks, N:M) and every baseline (absmax-STE, LSQ, stochastic
rounding, FP8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sparsejax.quant import (
    STAT_NAMES,
    absmax_ste,
    denoise_quant,
    denoise_with_stats,
    fp8,
    fp8_ste,
    lsq,
    quantize,
    ridge_dequant,
    stochastic_round,
)
from sparsejax.sparsity import nm_mask
from sparsejax.transforms import Context, Site, SpecError, build_spec

BITS = [1, 1.5, 2, 4, 8]
SHAPES_AXES = [((256, 6), 0), ((3, 5, 256), -1), ((300, 4), 0), ((7, 200), 1), ((50, 3), 0)]


def normal(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def np_blocks(x: np.ndarray, block: int, axis: int) -> list[np.ndarray]:
    """The blocks of ``x`` as a list of ``(..., length)`` arrays (the last one shorter)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return [x[..., i:i + block] for i in range(0, x.shape[-1], block)]


def np_ridge(x: np.ndarray, q: np.ndarray, lam: float, affine: bool):
    """Closed form of docs/methods.md §3 per block (last axis), float64, population moments."""
    if affine:
        mx, mq = x.mean(-1, keepdims=True), q.mean(-1, keepdims=True)
        s = ((x - mx) * (q - mq)).mean(-1, keepdims=True) / (((q - mq) ** 2).mean(
            -1, keepdims=True) + lam)
        return s, mx - s * mq
    s = (x * q).mean(-1, keepdims=True) / ((q * q).mean(-1, keepdims=True) + lam)
    return s, np.zeros_like(s)


def np_grid(x: np.ndarray, bits: float, affine: bool):
    """Reference pre-transform of one block (last axis): ``(q_int, s_f, b_f)``."""
    if affine:
        levels = 3 if bits == 1.5 else 2 ** int(bits)
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        s = np.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
        return np.clip(np.round((x - lo) / s), 0, levels - 1), s, lo
    if bits <= 1.5:
        s = np.abs(x).mean(-1, keepdims=True)
        s = np.where(s > 0, s, 1.0)
        q = np.sign(x) if bits == 1 else np.clip(np.round(x / s), -1, 1)
        return q, s, np.zeros_like(s)
    top = 2 ** (int(bits) - 1) - 1
    s = np.abs(x).max(-1, keepdims=True) / top
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.round(x / s), -top, top), s, np.zeros_like(s)


# --------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, axis", SHAPES_AXES)
def test_quantize_matches_numpy_grid_per_block(bits, affine, shape, axis):
    x = normal(shape, seed=1)
    q, s_f, b_f = quantize(x, bits, affine=affine, block_size=128, axis=axis)
    assert q.shape == x.shape and q.dtype == jnp.float32
    q_blocks = np_blocks(q, 128, axis)
    for i, xb in enumerate(np_blocks(x, 128, axis)):
        want_q, want_s, want_b = np_grid(xb, bits, affine)
        # float32 vs float64 may round differently within 1e-4 of a tie, nowhere else
        f = (xb - want_b) / want_s
        near_tie = np.abs(np.abs(f - np.floor(f)) - 0.5) < 1e-4
        np.testing.assert_allclose(np.where(near_tie, want_q, q_blocks[i]), want_q, atol=1e-6)
        np.testing.assert_allclose(np.moveaxis(np.asarray(s_f), axis, -1)[..., i],
                                   want_s[..., 0], rtol=1e-5)
        np.testing.assert_allclose(np.moveaxis(np.asarray(b_f), axis, -1)[..., i],
                                   want_b[..., 0], rtol=1e-5, atol=1e-7)


def test_quantize_affine_maps_block_min_and_max_to_grid_ends():
    x = normal((128, 3))
    q, _, _ = quantize(x, 4, affine=True)
    np.testing.assert_array_equal(q[jnp.argmin(x, 0), jnp.arange(3)], 0)
    np.testing.assert_array_equal(q[jnp.argmax(x, 0), jnp.arange(3)], 15)


def test_quantize_gradient_is_that_of_the_pretransform():
    x = normal((128, 2))
    _, s_f, _ = quantize(x, 2, affine=True)
    grad = jax.grad(lambda x: quantize(x, 2, affine=True)[0].sum())(x)
    np.testing.assert_allclose(grad, jnp.broadcast_to(1 / s_f, x.shape), rtol=1e-6)


# --------------------------------------------------------------------------- ridge


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("shape, axis", SHAPES_AXES)
def test_ridge_dequant_matches_float64_closed_form(affine, lam, shape, axis):
    x = normal(shape, seed=2) * 3.0 + 0.5
    q = jnp.round(normal(shape, seed=3) * 2.0) + x  # correlated with x, not on a grid
    s_g, b_g = ridge_dequant(x, q, lam=lam, affine=affine, block_size=128, axis=axis)
    for i, (xb, qb) in enumerate(zip(np_blocks(x, 128, axis), np_blocks(q, 128, axis),
                                     strict=True)):
        want_s, want_b = np_ridge(xb, qb, lam, affine)
        np.testing.assert_allclose(np.moveaxis(np.asarray(s_g), axis, -1)[..., i],
                                   want_s[..., 0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.moveaxis(np.asarray(b_g), axis, -1)[..., i],
                                   want_b[..., 0], rtol=2e-5, atol=1e-5)


def test_denoise_quant_output_is_the_ridge_fit_of_the_quantised_blocks():
    x = normal((256, 4), seed=4)
    q, _, _ = quantize(x, 2)
    want = np.concatenate([s * qb + b for s, b, qb in (
        (*np_ridge(xb, qb, 0.01, True), qb)
        for xb, qb in zip(np_blocks(x, 128, 0), np_blocks(q, 128, 0), strict=True))], -1)
    np.testing.assert_allclose(denoise_quant(x, 2), np.moveaxis(want, -1, 0), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_large_lambda_gives_the_block_mean(bits):
    x = normal((256, 3), seed=5) + 2.0
    x_hat = denoise_quant(x, bits, lam=1e9)
    means = np.stack([b.mean(-1) for b in np_blocks(x, 128, 0)])  # (blocks, 3)
    np.testing.assert_allclose(x_hat, np.repeat(means, 128, axis=0), rtol=1e-5)


def test_zero_lambda_on_a_constant_block_is_finite_and_exact():
    x = jnp.concatenate([jnp.full((128, 2), 0.7), normal((128, 2))], 0)
    x_hat, grad = jax.value_and_grad(lambda x: denoise_quant(x, 2, lam=0.0).sum())(x)
    out = denoise_quant(x, 2, lam=0.0)
    assert np.isfinite(x_hat) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(out[:128], 0.7, rtol=1e-6)
    assert np.all(np.isfinite(out))
    assert np.all(np.isfinite(denoise_quant(jnp.zeros((128, 2)), 1, lam=0.0, affine=False)))


@pytest.mark.slow
@pytest.mark.parametrize("affine", [True, False])
def test_ragged_blocks_equal_quantising_each_slice_alone(affine):
    """Pad-and-mask: a length of 300 in blocks of 128 is blocks [0:128], [128:256],
    [256:300], exactly as if each slice were its own tensor - values and gradients."""
    x = normal((300, 5), seed=6)
    w = normal((300, 5), seed=7)

    def loss(x, block):
        return jnp.sum(w[:x.shape[0]] * denoise_quant(x, 2, affine=affine, block_size=block))

    out = denoise_quant(x, 2, affine=affine, block_size=128)
    pieces = [denoise_quant(x[a:b], 2, affine=affine, block_size=b - a)
              for a, b in ((0, 128), (128, 256), (256, 300))]
    np.testing.assert_allclose(out, jnp.concatenate(pieces), rtol=1e-6, atol=1e-6)
    grad = jax.grad(loss)(x, 128)
    for a, b in ((0, 128), (128, 256), (256, 300)):
        g = jax.grad(lambda s, a=a, b=b: jnp.sum(
            w[a:b] * denoise_quant(s, 2, affine=affine, block_size=b - a)))(x[a:b])
        np.testing.assert_allclose(grad[a:b], g, rtol=1e-5, atol=1e-6)


def test_a_block_longer_than_the_axis_is_one_block():
    x = normal((40, 3))
    np.testing.assert_array_equal(denoise_quant(x, 4, block_size=128),
                                  denoise_quant(x, 4, block_size=40))


# --------------------------------------------------------------------------- gradients


def smooth_part_float64(x: np.ndarray, delta: np.ndarray, s_f: np.ndarray, b_f: np.ndarray,
                        lam: float, affine: bool) -> np.ndarray:
    """``x_hat`` with the rounding noise and the grid frozen (one block on the last axis):
    the function whose derivative the corrective path must give."""
    q = (x - b_f) / s_f + delta
    s, b = np_ridge(x, q, lam, affine)
    return s * q + b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gradient_matches_finite_differences_of_the_smooth_part(affine, bits):
    x = normal((4, 128), seed=8)
    w = np.asarray(normal((4, 128), seed=9), np.float64)
    grad = jax.grad(lambda x: jnp.sum(w * denoise_quant(x, bits, affine=affine, axis=-1)))(x)
    q, s_f, b_f = (np.asarray(a, np.float64) for a in quantize(x, bits, affine=affine, axis=-1))
    x64 = np.asarray(x, np.float64)
    delta = q - (x64 - b_f) / s_f
    direction = np.asarray(normal((4, 128), seed=10), np.float64)
    eps = 1e-6

    def loss(v):
        return np.sum(w * smooth_part_float64(v, delta, s_f, b_f, 0.01, affine))

    fd = (loss(x64 + eps * direction) - loss(x64 - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), fd,
                               rtol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
def test_corrective_path_makes_the_gradient_differ_from_plain_ste(affine):
    x = normal((256, 4), seed=11)
    w = normal((256, 4), seed=12)
    grad = jax.grad(lambda x: jnp.sum(w * denoise_quant(x, 2, affine=affine)))(x)
    ste_grad = jax.grad(lambda x: jnp.sum(w * absmax_ste(x, 2)))(x)
    np.testing.assert_array_equal(ste_grad, w)  # the STE passes the cotangent through
    assert float(jnp.max(jnp.abs(grad - w))) > 0.1


def test_custom_vjp_matches_autodiff_of_the_ridge_fit():
    """The hand-written VJP against JAX autodiff of the same forward (public pieces)."""
    x = normal((3, 300), seed=13)
    w = normal((3, 300), seed=14)

    def reference(x):
        q, _, _ = quantize(x, 3, axis=-1)
        s_g, b_g = ridge_dequant(x, q, axis=-1)
        s = jnp.repeat(s_g, 128, axis=-1)[..., :300]
        b = jnp.repeat(b_g, 128, axis=-1)[..., :300]
        return jnp.sum(w * (s * q + b))

    ours = jax.grad(lambda x: jnp.sum(w * denoise_quant(x, 3, axis=-1)))(x)
    np.testing.assert_allclose(ours, jax.grad(reference)(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- sparsity, dtypes


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_then_linear_quantisation_keeps_pruned_entries_zero(n, m):
    x = normal((256, 8), seed=15)
    out = np.asarray(denoise_quant(x, 4, affine=False, nm=(n, m)))
    kept = np.asarray(nm_mask(x, n, m, 0))
    np.testing.assert_array_equal(out[~kept], 0.0)
    # kept entries are quantised; a small one may round to 0, never more than n survive
    groups = np.moveaxis(out, 0, -1).reshape(-1, m)
    assert np.all((groups != 0).sum(-1) <= n) and np.mean(out[kept] != 0) > 0.8
    grad = jax.grad(lambda x: denoise_quant(x, 4, affine=False, nm=(n, m)).sum())(x)
    assert np.all(grad != 0)  # pruned entries still learn (x_S = x + sg(prune(x) - x))


def _quantize_with_stats(x, method, block_size=128, axis=-1):
    """A quant method applied to activations ``x`` through its registered transform."""
    spec = build_spec("quant", {"method": method, **({} if method == "fp8" else
                                                       {"bits": 4, "block_size": block_size})})
    site = Site("activations" if axis == -1 else "weights", x.shape)
    y, _, stats = spec.apply(x, {}, {}, site, Context(True, jax.random.key(0)))
    return y, stats


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method", ["dat", "absmax_ste", "fp8"])
def test_output_has_the_input_shape_and_dtype(dtype, method):
    x = normal((2, 64, 96), dtype=dtype)
    out, stats = _quantize_with_stats(x, method, block_size=32)
    assert out.shape == x.shape and out.dtype == dtype
    assert set(stats) == set(STAT_NAMES)
    grad = jax.grad(lambda x: _quantize_with_stats(x, method)[0]
                    .astype(jnp.float32).sum())(x)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_denoising_lowers_the_reconstruction_error_it_reports():
    x = normal((512, 16), seed=16)
    out, stats = denoise_with_stats(x, 2, True, 0.01, 128, axis=0)
    mse = float(jnp.mean((out - x) ** 2))
    np.testing.assert_allclose(stats["mse"], mse, rtol=1e-4)
    assert float(stats["mse"]) < float(stats["mse_naive"])
    assert float(stats["clip_frac"]) == 0.0  # min/max grid cannot clip


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", [None, 64])
def test_absmax_ste_matches_numpy_with_identity_gradient(bits, block_size):
    x = normal((128, 5), seed=17)
    out = absmax_ste(x, bits, block_size=block_size, axis=0)
    x64 = np.asarray(x, np.float64)
    if block_size is None:
        q, s, _ = np_grid(x64.reshape(1, -1), bits, affine=False)
        want = (q * s).reshape(x.shape)
    else:
        want = np.concatenate([np.moveaxis(q * s, -1, 0) for q, s, _ in (
            np_grid(b, bits, False) for b in np_blocks(x64, block_size, 0))])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jax.grad(lambda x: absmax_ste(x, bits).sum())(x), 1.0)


@pytest.mark.parametrize("bits", [1.5, 2, 4, 8])
def test_lsq_matches_numpy_and_its_step_gradient(bits):
    qn, qp = (1, 1) if bits == 1.5 else (2 ** (int(bits) - 1), 2 ** (int(bits) - 1) - 1)
    x = normal((64,), seed=18) * 2.0
    step = jnp.asarray(0.3)
    g = 1.0 / np.sqrt(64 * qp)
    v = np.clip(np.asarray(x, np.float64) / 0.3, -qn, qp)
    np.testing.assert_allclose(lsq(x, step, bits, grad_scale=g), np.round(v) * 0.3, rtol=1e-5)
    dx, ds = jax.grad(lambda x, s: lsq(x, s, bits, grad_scale=g).sum(), (0, 1))(x, step)
    inside = (np.asarray(x) / 0.3 > -qn) & (np.asarray(x) / 0.3 < qp)
    np.testing.assert_array_equal(dx, inside.astype(np.float32))
    # LSQ's step gradient: round(v) - v inside the range, -Q_n / Q_p outside; times g.
    want = np.where(inside, np.round(v) - np.asarray(x, np.float64) / 0.3, v).sum() * g
    np.testing.assert_allclose(ds, want, rtol=1e-4)


def test_lsq_rejects_one_bit():
    with pytest.raises(ValueError, match="bits=1"):
        lsq(jnp.ones(3), jnp.asarray(1.0), 1)


def test_stochastic_round_is_unbiased_onto_neighbouring_integers():
    x = jnp.asarray([0.25, -1.7, 3.5, 2.0, -0.1])
    draws = jax.vmap(lambda k: stochastic_round(x, k))(jax.random.split(jax.random.key(0),
                                                                        20000))
    draws = np.asarray(draws)
    assert np.all((draws == np.floor(x)) | (draws == np.ceil(x)))
    frac = np.asarray(x) - np.floor(x)
    se = np.sqrt(frac * (1 - frac) / draws.shape[0]) + 1e-12
    assert np.all(np.abs(draws.mean(0) - np.asarray(x)) <= 5 * se + 1e-6)
    np.testing.assert_array_equal(jax.grad(lambda x: stochastic_round(x, jax.random.key(1))
                                           .sum())(x), 1.0)


@pytest.mark.parametrize("fmt, np_dtype", [("e4m3", ml_dtypes.float8_e4m3fn),
                                           ("e5m2", ml_dtypes.float8_e5m2)])
def test_fp8_matches_an_ml_dtypes_cast_with_amax_scaling(fmt, np_dtype):
    x = np.asarray(normal((1000,), seed=19)) * 5.0
    scale = np.abs(x).max() / float(ml_dtypes.finfo(np_dtype).max)
    want = (x / scale).astype(np_dtype).astype(np.float32) * scale
    np.testing.assert_allclose(fp8(jnp.asarray(x), fmt), want, rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(lambda x: fp8_ste(x, fmt).sum())(jnp.asarray(x)),
                                  1.0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 9, 2.5, -1, "four"])
def test_invalid_bits_raise_with_the_value(bits):
    with pytest.raises(ValueError, match=f"bits={bits!r}"):
        denoise_quant(jnp.ones((8, 2)), bits)


@pytest.mark.parametrize("block_size", [0, -4])
def test_invalid_block_size_raises_with_the_value(block_size):
    with pytest.raises(ValueError, match=f"block_size={block_size}"):
        quantize(jnp.ones((8, 2)), 4, block_size=block_size)


@pytest.mark.parametrize("lam", [-0.1, float("nan")])
def test_negative_lambda_raises_with_the_value(lam):
    with pytest.raises(ValueError, match="lam="):
        ridge_dequant(jnp.ones((8, 2)), jnp.ones((8, 2)), lam=lam)


def test_quant_specs_validate_their_fields():
    with pytest.raises(SpecError, match="'datt' is not one of"):
        build_spec("quant", {"method": "datt"})
    with pytest.raises(SpecError, match="fmt 'e3m4'") as err:
        build_spec("quant", {"method": "fp8", "fmt": "e3m4"})
    assert err.value.field == "fmt"
    # a sibling's field at its default is what a DAT config carries: ignored by fp8 ...
    assert build_spec("quant", {"method": "fp8", "bits": 4}) == build_spec("quant",
                                                                          {"method": "fp8"})
    with pytest.raises(SpecError, match="no field 'bits'") as err:  # ... set, refused
        build_spec("quant", {"method": "fp8", "bits": 2})
    assert err.value.field == "bits"
    with pytest.raises(SpecError, match="LSQ needs bits >= 1.5"):
        build_spec("quant", {"method": "lsq", "bits": 1})
