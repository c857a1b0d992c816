"""Properties of the N:M and quantisation transforms for arbitrary shapes and values
(hypothesis), and every transform giving the same answer under ``jax.jit`` as op by op
(chex variants)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsejax import analog, quant, sparsity
from sparsejax.transforms.analog import AnalogSpec

PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]
# Shapes are drawn from a few sizes so that jit traces stay few; values are any finite
# float32 (ties, zeros, huge and tiny magnitudes included).
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FINITE = st.floats(-2.0 ** 100, 2.0 ** 100, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def grouped_arrays(draw):
    """``(w, n, m, axis)``: a float32 array whose ``axis`` holds whole groups of ``m``."""
    n, m = draw(st.sampled_from(PATTERNS))
    groups = draw(st.integers(1, 3))
    other = draw(st.sampled_from([(), (3,), (2, 5)]))
    axis = draw(st.integers(0, len(other)))
    shape = list(other)
    shape.insert(axis, groups * m)
    w = draw(hnp.arrays(np.float32, tuple(shape), elements=FINITE))
    return w, n, m, axis


def _groups(a: np.ndarray, m: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(a, axis, -1)
    return moved.reshape(-1, m)


@SETTINGS
@given(grouped_arrays())
def test_nm_mask_keeps_exactly_n_largest_magnitudes_per_group(case):
    w, n, m, axis = case
    mask = _groups(np.asarray(sparsity.nm_mask(jnp.asarray(w), n, m, axis)), m, axis)
    mags = np.abs(_groups(w, m, axis))
    np.testing.assert_array_equal(mask.sum(-1), n)
    kept_min = np.where(mask, mags, np.inf).min(-1)
    dropped_max = np.where(mask, -np.inf, mags).max(-1)
    assert np.all(kept_min >= dropped_max)


@SETTINGS
@given(grouped_arrays())
def test_hard_and_soft_pruning_leave_at_most_n_nonzeros_per_group(case):
    w, n, m, axis = case
    x = jnp.asarray(w)
    for out in (sparsity.ste(x, n, m, axis), sparsity.soft_threshold(x, n, m, axis)):
        nonzero = _groups(np.asarray(out), m, axis) != 0
        assert np.all(nonzero.sum(-1) <= n)
    # the soft threshold never grows a magnitude and keeps the sign
    soft = np.asarray(sparsity.soft_threshold(x, n, m, axis))
    assert np.all(np.abs(soft) <= np.abs(w))
    assert np.all(np.sign(soft) * np.sign(w) >= 0)


@st.composite
def blocked_arrays(draw):
    """``(x, bits, block)``: a (length, columns) float32 array and a quantisation setting."""
    length = draw(st.sampled_from([5, 16, 40]))
    columns = draw(st.sampled_from([1, 3]))
    block = draw(st.sampled_from([4, 16, 128]))
    bits = draw(st.sampled_from([1, 1.5, 2, 3, 4, 8]))
    values = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)
    x = draw(hnp.arrays(np.float32, (length, columns), elements=values))
    return x, bits, block


def _levels(bits: float) -> int:
    return 3 if bits == 1.5 else 2 ** int(bits)


def _nonzero_levels(values: np.ndarray, source: np.ndarray, bits: float) -> int:
    """Distinct values, not counting the exact zeros that 1-bit ``sign`` keeps (a pruned
    weight stays 0 at no storage cost: docs/methods.md §3); those must sit where ``source``
    is exactly 0."""
    if bits == 1:
        assert np.all((values == 0) <= (source == 0)), "1-bit gave 0 for a non-zero input"
        values = values[source != 0]
    return len(np.unique(values))


def _per_block(a: np.ndarray, block: int) -> list[np.ndarray]:
    block = min(block, a.shape[0])
    return [a[i:i + block, c] for c in range(a.shape[1]) for i in range(0, a.shape[0], block)]


@pytest.mark.slow  # ~16 s of examples; the default suite counts levels in test_quant_training.py
@SETTINGS
@given(blocked_arrays(), st.booleans())
def test_quantize_and_dat_use_at_most_2_to_the_bits_levels_per_block(case, affine):
    x, bits, block = case
    q, _, _ = quant.quantize(jnp.asarray(x), bits, affine=affine, block_size=block)
    out = quant.denoise_quant(jnp.asarray(x), bits, affine=affine, block_size=block)
    lo, hi = (0, _levels(bits) - 1) if affine else (
        (-1, 1) if bits <= 1.5 else (-(2 ** (int(bits) - 1) - 1), 2 ** (int(bits) - 1) - 1))
    q = np.asarray(q)
    assert np.all(q == np.round(q)) and q.min() >= lo and q.max() <= hi
    for qb, ob, xb in zip(_per_block(q, block), _per_block(np.asarray(out), block),
                          _per_block(x, block), strict=True):
        sign_bits = 0 if affine else bits  # the affine 1-bit grid {0, 1} keeps no zero
        assert _nonzero_levels(qb, xb, sign_bits) <= _levels(bits)
        # the dequantiser is one affine map per block: as many output values as grid values
        assert len(np.unique(ob)) <= len(np.unique(qb))
    assert np.all(np.isfinite(np.asarray(out)))


@SETTINGS
@given(blocked_arrays())
def test_absmax_ste_never_leaves_the_block_range(case):
    x, bits, block = case
    out = np.asarray(quant.absmax_ste(jnp.asarray(x), bits, block_size=block))
    for xb, ob in zip(_per_block(x, block), _per_block(out, block), strict=True):
        bound = np.abs(xb).max() if bits >= 2 else np.abs(xb).mean()
        assert np.all(np.abs(ob) <= bound * (1 + 1e-6) + 1e-30)
        assert _nonzero_levels(ob, xb, bits) <= _levels(bits)


# --------------------------------------------------------------------------- jit / no-jit

W = jax.random.normal(jax.random.key(3), (64, 12))
KEY = jax.random.key(4)


class TransformsUnderJitTest(chex.TestCase):
    """Each transform gives the same value (and gradient) jitted and op by op."""

    def _check(self, fn, *args):
        expected = fn(*args)
        got = self.variant(fn)(*args)
        chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)
        chex.assert_equal_shape([got, expected])

    @chex.variants(with_jit=True, without_jit=True)
    def test_sparsity_transforms(self):
        beta = sparsity.sste_scale(W)
        self._check(lambda w: sparsity.sste(w, beta), W)
        self._check(lambda w: sparsity.sr_ste(w, 2, 4, 0, 1e-3), W)
        self._check(lambda w: jax.grad(lambda v: jnp.sum(sparsity.sr_ste(v) ** 3))(w), W)
        self._check(lambda w: sparsity.mvue24(w, KEY), W)
        logits = sparsity.init_mask_logits(KEY, W)
        self._check(lambda lg: sparsity.gumbel_nm_mask(lg, KEY, 1.0, 100.0), logits)

    @chex.variants(with_jit=True, without_jit=True)
    def test_quant_transforms(self):
        self._check(lambda w: quant.denoise_quant(w, 2), W)
        self._check(lambda w: jax.grad(lambda v: jnp.sum(quant.denoise_quant(v, 2) ** 2))(w), W)
        self._check(lambda w: quant.absmax_ste(w, 4, block_size=16), W)
        self._check(lambda w: quant.lsq(w, jnp.float32(0.3), 3), W)
        self._check(lambda w: quant.fp8(w, "e5m2"), W)

    @chex.variants(with_jit=True, without_jit=True)
    def test_analog_transforms(self):
        spec = AnalogSpec(dac_bits=6, adc_bits=6, out_noise=0.05, read_noise=0.02)
        x = jax.random.normal(jax.random.key(5), (5, 64))
        self._check(lambda xx, w: analog.analog_matmul(xx, w, spec, KEY), x, W)
        self._check(lambda w: analog.weight_noise(w, KEY, 0.1, "mult"), W)
        model = analog.PCMNoiseModel()
        self._check(lambda w: model.read(model.program(w, KEY), 86400.0, KEY), W)


def test_straight_through_is_exact_forward_and_identity_backward():
    from sparsejax.estimators import straight_through

    x = jnp.array([5.0, -1.0, 0.3], jnp.float32)
    value = jnp.array([1.1, -1.1, 0.0], jnp.float32)
    assert (x + jax.lax.stop_gradient(value - x))[0] != value[0]  # the usual form is off
    np.testing.assert_array_equal(straight_through(x, value), value)
    grad = jax.grad(lambda v: jnp.sum(straight_through(v, jnp.round(v)) * jnp.arange(3.0)))(x)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 2.0])
    tangent = jax.jvp(lambda v: straight_through(v, v ** 2), (x,), (jnp.ones(3),))[1]
    np.testing.assert_array_equal(tangent, np.ones(3))
