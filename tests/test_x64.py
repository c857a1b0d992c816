"""The public transforms with ``jax_enable_x64`` on, on float32 and float64 inputs.

Anyone who uses the float64 log-Bessel functions turns x64 on for the whole process, so
every transform must keep working there: the dtype it returns is the input's, float64
inputs are computed in float64 (statistics included), and a float32 input gives the same
answer as with x64 off. ``test_transform_suites_pass_with_x64_on`` (slow) runs the
transform test files themselves in a process with ``JAX_ENABLE_X64=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sparsejax.kernels import log_bessel as lb
from sparsejax.kernels import nm_matmul as nmk

from sparsejax import analog, quant, sparsity, special
from sparsejax.transforms.analog import AnalogSpec
from tests.conftest import REPO

KEY = jax.random.key(0)
W = np.random.default_rng(0).normal(size=(256, 24))  # 2 blocks of 128 along axis 0
X = np.random.default_rng(1).normal(size=(6, 256))
ORDERS, ARGS = np.array([0.5, 3.0, 40.0, 700.0]), np.array([0.01, 2.5, 35.0, 900.0])

# name -> f(w, x) for w (256, 24) and x (6, 256) of one dtype. DETERMINISTIC ones are held
# to the float32 answer; RANDOM ones draw float64 noise from other bits than float32 noise.
DETERMINISTIC = {
    "nm_mask": lambda w, x: sparsity.nm_mask(w).astype(w.dtype) * w,
    "soft_threshold": lambda w, x: sparsity.soft_threshold(w),
    "sste": lambda w, x: sparsity.sste(w, sparsity.sste_scale(w)),
    "ste": lambda w, x: sparsity.ste(w),
    "sr_ste": lambda w, x: sparsity.sr_ste(w),
    "quantize": lambda w, x: quant.quantize(w, 4)[0].astype(w.dtype),
    "denoise_quant_affine": lambda w, x: quant.denoise_quant(w, 2),
    "denoise_quant_1bit": lambda w, x: quant.denoise_quant(w, 1, affine=False),
    "denoise_quant_2_4": lambda w, x: quant.denoise_quant(w, 4, affine=False, nm=(2, 4)),
    "absmax_ste": lambda w, x: quant.absmax_ste(w, 4),
    "lsq": lambda w, x: quant.lsq(w, jnp.asarray(0.2, w.dtype), 4),
    "fp8": lambda w, x: quant.fp8(w),
    "clip_weights_gaussian": lambda w, x: analog.clip_weights_gaussian(w),
    "dac": lambda w, x: analog.dac(w / 4, 8),
    "adc": lambda w, x: analog.adc(w, 8, 2.0),
    "analog_matmul": lambda w, x: analog.analog_matmul(
        x, w, AnalogSpec(dac_bits=8, adc_bits=8), None),
    "nm_matmul_reference": lambda w, x: nmk.nm_matmul_reference(
        x, nmk.pack_nm(w, prune=True)),
    "nm_matmul_pallas": lambda w, x: nmk.nm_matmul(x, nmk.pack_nm(w, prune=True),
                                                   interpret=True),
    "log_iv": lambda w, x: special.log_iv(jnp.asarray(ORDERS, w.dtype),
                                          jnp.asarray(ARGS, w.dtype)),
    "log_kve": lambda w, x: special.log_kve(jnp.asarray(ORDERS, w.dtype),
                                            jnp.asarray(ARGS, w.dtype)),
    "log_bessel_reference": lambda w, x: lb.log_bessel_reference(
        jnp.asarray(ORDERS, w.dtype), jnp.asarray(ARGS, w.dtype), "k"),
}
RANDOM = {
    "mvue24": lambda w, x: sparsity.mvue24(w, KEY),
    "stochastic_round": lambda w, x: quant.stochastic_round(w, KEY),
    "weight_noise": lambda w, x: analog.weight_noise(w, KEY, 0.1),
    "activation_noise": lambda w, x: analog.activation_noise(x, KEY, 0.1, correlated=True),
    "output_noise": lambda w, x: analog.output_noise(x, KEY, 0.1),
    "read_noise_mvm": lambda w, x: analog.read_noise_mvm(x, w, KEY, 0.0175),
    "pcm_program_and_read": lambda w, x: analog.PCMNoiseModel().read(
        analog.PCMNoiseModel().program(w, KEY), 3600.0, KEY),
}
# fp8 rounds onto an 8-bit grid: float32 and float64 inputs can land on neighbouring grid
# points where an entry sits at a rounding boundary; the rest agree to float32 precision.
TOLERANCE = {"fp8": 0.07}


def _call(fn, dtype):
    return fn(jnp.asarray(W, dtype), jnp.asarray(X, dtype))


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_transform_keeps_the_input_dtype_with_x64_on(name):
    fn = RANDOM[name]
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            out = _call(fn, dtype)
            assert out.dtype == dtype, f"{name}: {dtype.__name__} in, {out.dtype} out"
            assert np.all(np.isfinite(np.asarray(out))), name


HEAVY_X64 = {"log_bessel_reference", "nm_matmul_pallas"}  # ~5 s each: in the slow suite


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY_X64
                                  else n for n in sorted(DETERMINISTIC)])
def test_float64_input_keeps_its_dtype_and_agrees_with_float32(name):
    """With x64 on, a float32 input gives float32 and the answer it gives with x64 off; a
    float64 input gives float64 within float32 precision of it."""
    fn = DETERMINISTIC[name]
    plain32 = np.asarray(_call(fn, jnp.float32), np.float64)
    with jax.enable_x64(True):
        out32, out64 = _call(fn, jnp.float32), _call(fn, jnp.float64)
    assert (out32.dtype, out64.dtype) == (jnp.float32, jnp.float64), name
    x64_32, x64_64 = np.asarray(out32, np.float64), np.asarray(out64)
    assert np.all(np.isfinite(x64_64)), name
    np.testing.assert_allclose(x64_32, plain32, rtol=1e-6, atol=1e-6)
    tol = TOLERANCE.get(name, 2e-5)
    np.testing.assert_allclose(x64_64, plain32, rtol=tol, atol=tol)


def test_float64_statistics_are_computed_in_float64():
    # A block whose values differ only beyond float32 precision: float32 sees one value.
    base = 1.0 + np.arange(128) * 1e-12
    with jax.enable_x64(True):
        q, s_f, b_f = quant.quantize(jnp.asarray(base[:, None]), 2)
        assert q.dtype == s_f.dtype == jnp.float64
        assert float(s_f[0, 0]) == pytest.approx(127e-12 / 3, rel=1e-6)
        _, stats = quant.denoise_with_stats(jnp.asarray(base[:, None]), 2, True, 0.01, 128,
                                            axis=0)
        assert all(v.dtype == jnp.float64 for v in stats.values())


TRANSFORM_TESTS = ["tests/test_sparsity.py", "tests/test_quant.py", "tests/test_analog.py",
                   "tests/test_special.py", "tests/test_nm_matmul.py"]


@pytest.mark.slow
def test_transform_suites_pass_with_x64_on():
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-m", "not slow", *TRANSFORM_TESTS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
