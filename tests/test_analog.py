"""Analog transforms (sparsejax.analog): statistics of the noise and of the PCM model,
gradients, converters; fixed seeds, >= 1e5 samples, tolerances stated per test."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sparsejax.analog import (
    PCMNoiseModel,
    activation_noise,
    adc,
    analog_matmul,
    clip_weights_gaussian,
    dac,
    drift_compensation,
    output_noise,
    read_noise_mvm,
    weight_noise,
)
from sparsejax.transforms.analog import AnalogSpec

N = 200_000  # samples per statistic: std error of a std estimate ~ sigma / sqrt(2N) = 0.16%
PCM = PCMNoiseModel()
RATIOS = (0.1, 0.5, 1.0)


def _folded_normal_moments(mu: float, sigma: float) -> tuple[float, float]:
    """Mean and std of |X|, X ~ N(mu, sigma^2)."""
    mean = (sigma * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sigma ** 2))
            + mu * (1 - 2 * stats.norm.cdf(-mu / sigma)))
    return mean, math.sqrt(mu ** 2 + sigma ** 2 - mean ** 2)


@pytest.mark.parametrize("ratio", RATIOS)
def test_programming_noise_std_follows_the_polynomial(ratio):
    g_target = jnp.full((N,), ratio * PCM.g_max)
    g_prog, _ = PCM.program_conductance(g_target, jax.random.key(0))
    expected = 0.26348 + 1.9650 * ratio - 1.1731 * ratio ** 2  # uS, docs/methods.md §5
    assert float(PCM.programming_noise_std(g_target[0])) == pytest.approx(expected, rel=1e-6)
    # clipping at 0 is > 5 sigma away at these points, so the std is the polynomial's
    assert float(jnp.std(g_prog - g_target)) == pytest.approx(expected, rel=0.01)
    assert abs(float(jnp.mean(g_prog - g_target))) < 4 * expected / math.sqrt(N)


@pytest.mark.parametrize("ratio", RATIOS)
def test_drift_exponents_have_the_fitted_mean_and_std(ratio):
    g_target = jnp.full((N,), ratio * PCM.g_max)
    _, nu = PCM.program_conductance(g_target, jax.random.key(1))
    mu = min(max(-0.0155 * math.log(ratio) + 0.0244, 0.049), 0.1)
    sigma = min(max(-0.0125 * math.log(ratio) - 0.0059, 0.008), 0.045)
    mean, std = _folded_normal_moments(mu, sigma)  # nu = |N(mu, sigma)|
    assert float(jnp.mean(nu)) == pytest.approx(mean, rel=0.005)
    assert float(jnp.std(nu)) == pytest.approx(std, rel=0.01)
    assert float(jnp.min(nu)) >= 0


def test_drift_exponent_fit_clips_at_both_ends():
    mu, sigma = PCM.drift_exponent_stats(jnp.asarray([0.0, 1e-9, 25.0, 1e3]))
    np.testing.assert_allclose(mu, [0.1, 0.1, 0.049, 0.049])
    np.testing.assert_allclose(sigma, [0.045, 0.045, 0.008, 0.008])


def test_conductances_are_never_negative():
    w = jax.random.normal(jax.random.key(2), (N,)) * jax.random.uniform(jax.random.key(3), (N,))
    programmed = PCM.program(w, jax.random.key(4))
    assert float(jnp.min(programmed.g_plus)) >= 0 and float(jnp.min(programmed.g_minus)) >= 0
    # the idle device of each pair targets 0 uS but is programmed with noise: some are > 0
    assert float(jnp.mean(programmed.g_minus[w > 0] > 0)) > 0.3
    for t in (0.0, 60.0, 3.15e7):
        g = PCM.read_conductance(programmed.g_minus, programmed.nu_minus, t, jax.random.key(5))
        assert float(jnp.min(g)) >= 0


@pytest.mark.parametrize("ratio", RATIOS)
def test_read_noise_std_grows_with_time_as_the_1_over_f_formula(ratio):
    g_prog = jnp.full((N,), ratio * PCM.g_max)
    nu = jnp.full((N,), 0.05)
    q_s = min(0.0088 / max(ratio ** 0.65, 1e-3), 0.2)
    measured = []
    for i, t in enumerate((60.0, 3600.0, 86400.0, 3.15e7)):
        g = PCM.read_conductance(g_prog, nu, t, jax.random.key(10 + i))
        drifted = ratio * PCM.g_max * ((t + PCM.t0) / PCM.t0) ** -0.05
        # mean: the drift law; relative std: Q_s sqrt(ln((t + t0 + t_read) / (2 t_read)))
        expected = q_s * math.sqrt(math.log((t + PCM.t0 + PCM.t_read) / (2 * PCM.t_read)))
        assert abs(float(jnp.mean(g)) - drifted) < 5 * expected * drifted / math.sqrt(N)
        assert float(jnp.std(g / drifted - 1)) == pytest.approx(expected, rel=0.01)
        measured.append(float(jnp.std(g / drifted - 1)))
    assert measured == sorted(measured)


def test_read_at_time_zero_drifts_nothing_and_weights_come_back_in_their_scale():
    w = jnp.linspace(-3.0, 3.0, 101)
    quiet = PCMNoiseModel(prog_noise_scale=0.0, read_noise_scale=0.0)
    programmed = quiet.program(w, jax.random.key(0))
    np.testing.assert_allclose(quiet.read(programmed, 0.0, jax.random.key(1)), w, atol=1e-6)
    np.testing.assert_allclose(quiet.weights_at_programming(programmed), w, atol=1e-6)
    later = quiet.read(programmed, 86400.0, jax.random.key(1))
    assert np.all(np.abs(later) <= np.abs(w) + 1e-6)  # nu >= 0: drift only shrinks
    assert float(jnp.sum(jnp.abs(later)) / jnp.sum(jnp.abs(w))) < (86420 / 20) ** -0.03
    assert np.all(np.sign(later[w != 0]) == np.sign(w[w != 0]))


def test_drift_compensation_restores_the_reference_output_magnitude():
    w = jax.random.normal(jax.random.key(0), (256, 64))
    programmed = PCM.program(w, jax.random.key(1))
    w_ref = PCM.weights_at_programming(programmed)
    w_t = PCM.read(programmed, 3.15e7, jax.random.key(2))
    alpha = drift_compensation(w_ref, w_t)
    assert float(alpha) > 1.5  # a year of drift: ((3.15e7 + 20) / 20) ** -nu ~ 0.4
    assert float(jnp.mean(jnp.abs(alpha * w_t))) == pytest.approx(
        float(jnp.mean(jnp.abs(w_ref))), rel=1e-5)
    probe = jax.random.normal(jax.random.key(3), (32, 256))
    alpha_p = drift_compensation(w_ref, w_t, probe)
    assert float(jnp.mean(jnp.abs(probe @ (alpha_p * w_t)))) == pytest.approx(
        float(jnp.mean(jnp.abs(probe @ w_ref))), rel=1e-5)
    # compensated weights are closer to the programmed ones than the drifted weights
    assert float(jnp.linalg.norm(alpha * w_t - w_ref)) < 0.5 * float(jnp.linalg.norm(w_t - w_ref))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_additive_weight_noise_has_std_sigma_times_max_abs_w(dtype):
    w = (jax.random.normal(jax.random.key(0), (N,)) * 0.1).astype(dtype)
    noisy = weight_noise(w, jax.random.key(1), 0.06, "add")
    assert noisy.dtype == dtype
    delta = noisy.astype(jnp.float32) - w.astype(jnp.float32)
    scale = 0.06 * float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    rel = 0.01 if dtype == jnp.float32 else 0.03  # bf16 rounding of w + noise
    assert float(jnp.std(delta)) == pytest.approx(scale, rel=rel)
    assert abs(float(jnp.mean(delta))) < 5 * scale / math.sqrt(N)


def test_multiplicative_weight_noise_has_relative_std_sigma():
    w = jax.random.uniform(jax.random.key(0), (N,), minval=0.5, maxval=2.0)
    noisy = weight_noise(w, jax.random.key(1), 0.1, "mult")
    ratio = noisy / w - 1
    assert float(jnp.std(ratio)) == pytest.approx(0.1, rel=0.01)
    assert abs(float(jnp.mean(ratio))) < 5 * 0.1 / math.sqrt(N)


@pytest.mark.parametrize("kind", ["add", "mult"])
def test_clean_weights_receive_the_gradient_of_the_noisy_weights(kind):
    w = jax.random.normal(jax.random.key(0), (64, 32))
    x = jax.random.normal(jax.random.key(1), (16, 64))

    def loss(w, noisy_w=None):
        return jnp.sum(jnp.tanh(x @ (weight_noise(w, jax.random.key(2), 0.1, kind)
                                     if noisy_w is None else noisy_w)))

    noisy = weight_noise(w, jax.random.key(2), 0.1, kind)
    assert not np.allclose(noisy, w)
    # d loss / d w = d loss / d w_noisy (aihwkit: the update goes to the clean weights)
    np.testing.assert_allclose(jax.grad(loss)(w), jax.grad(lambda v: loss(w, v))(noisy),
                               rtol=1e-6)


@pytest.mark.parametrize("kind, std", [("add", 0.1), ("mult", 0.2)])
def test_uncorrelated_activation_noise_has_the_stated_moments(kind, std):
    a = jax.random.uniform(jax.random.key(0), (N // 100, 100), minval=0.5, maxval=1.5)
    noisy = activation_noise(a, jax.random.key(1), std, kind=kind)
    delta = noisy - a if kind == "add" else noisy / a - 1
    assert float(jnp.std(delta)) == pytest.approx(std, rel=0.01)
    assert abs(float(jnp.mean(delta))) < 5 * std / math.sqrt(N)
    # independent per neuron: neighbouring features are uncorrelated
    corr = np.corrcoef(np.asarray(delta[:, 0]), np.asarray(delta[:, 1]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(N // 100)


def test_correlated_activation_noise_is_one_draw_shared_across_the_layer():
    a = jnp.ones((N // 64, 8, 64))
    noisy = activation_noise(a, jax.random.key(0), 0.1, correlated=True)
    delta = np.asarray(noisy - a)
    np.testing.assert_allclose(delta, np.broadcast_to(delta[..., :1], delta.shape), atol=1e-7)
    per_vector = delta[..., 0].ravel()  # independent across vectors, std 0.1
    assert float(np.std(per_vector)) == pytest.approx(0.1, rel=0.02)
    corr = np.corrcoef(per_vector[:-1], per_vector[1:])[0, 1]
    assert abs(corr) < 5 / math.sqrt(per_vector.size)


def test_activation_noise_passes_the_gradient():
    a = jnp.linspace(-1, 1, 10)
    grad = jax.grad(lambda v: jnp.sum(activation_noise(v, jax.random.key(0), 0.1)))(a)
    np.testing.assert_allclose(grad, np.ones(10))


def test_output_noise_std_and_pcm_read_noise_spread():
    y = jnp.zeros((N,))
    assert float(jnp.std(output_noise(y, jax.random.key(0), 0.04))) == pytest.approx(
        0.04, rel=0.01)
    x = jnp.full((N // 100, 16), 0.5)
    w = jnp.full((16, 100), -0.25)
    noise = read_noise_mvm(x, w, jax.random.key(1), 0.0175)
    spread = math.sqrt(16 * 0.25 * 0.25)  # sqrt(sum_j |w_ij| x_j^2)
    assert float(jnp.std(noise)) == pytest.approx(0.0175 * spread, rel=0.01)


def test_gaussian_clip_bounds_weights_at_alpha_std():
    w = jax.random.normal(jax.random.key(0), (N,))
    clipped = clip_weights_gaussian(w, 2.5)
    bound = 2.5 * float(jnp.std(w))
    assert float(jnp.max(jnp.abs(clipped))) == pytest.approx(bound, rel=1e-6)
    assert float(jnp.mean(clipped != w)) == pytest.approx(2 * stats.norm.sf(2.5), rel=0.1)


@pytest.mark.parametrize("bits", [4, 8])
def test_dac_and_adc_have_2_to_the_bits_minus_1_levels_and_pass_gradients(bits):
    x = jnp.linspace(-1.5, 1.5, 20001)
    levels = np.unique(np.asarray(dac(x, bits)))
    assert len(levels) == 2 ** bits - 1 and levels.min() == -1 and levels.max() == 1
    y = adc(x * 8, bits, 10.0)
    assert len(np.unique(np.asarray(y))) <= 2 ** bits - 1
    np.testing.assert_allclose(np.diff(np.unique(np.asarray(y))), 20.0 / (2 ** bits - 2),
                               rtol=1e-4)
    grad = jax.grad(lambda v: jnp.sum(dac(v, bits)))(x)
    np.testing.assert_array_equal(grad, (jnp.abs(x) <= 1).astype(jnp.float32))


def test_analog_matmul_without_noise_is_the_digital_product_up_to_converters():
    x = jax.random.normal(jax.random.key(0), (8, 64))
    w = jax.random.normal(jax.random.key(1), (64, 16)) * 0.1
    exact = x @ w
    np.testing.assert_allclose(analog_matmul(x, w, AnalogSpec(), None), exact, rtol=1e-5,
                               atol=1e-6)
    spec = AnalogSpec(dac_bits=8, adc_bits=8, adc_bound=10.0)
    err = float(jnp.max(jnp.abs(analog_matmul(x, w, spec, None) - exact)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(exact)))
    noisy = analog_matmul(x, w, AnalogSpec(out_noise=0.04), jax.random.key(2))
    assert not np.allclose(noisy, exact)


@pytest.mark.parametrize("kwargs, needle", [
    ({"weight_noise": -0.1}, "weight_noise"),
    ({"weight_noise_kind": "gauss"}, "weight_noise_kind"),
    ({"dac_bits": 1}, "dac_bits"),
    ({"adc_bound": 0.0}, "adc_bound"),
])
def test_bad_analog_spec_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AnalogSpec(**kwargs)
