"""VonMisesFisher: closed forms at d = 2 and 3, sampling moments, stability and
gradients at large d and kappa (float64)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.distributions import VonMisesFisher


def _unit(key, d):
    mu = jax.random.normal(key, (d,), jnp.float64)
    return mu / jnp.linalg.norm(mu)


@pytest.mark.parametrize("kappa", [0.5, 5.0, 300.0])
def test_normaliser_and_entropy_match_the_closed_forms_at_d_3(kappa):
    with jax.enable_x64(True):
        dist = VonMisesFisher(_unit(jax.random.key(0), 3), jnp.float64(kappa))
        # C_3 = kappa / (4 pi sinh kappa); H = log(4 pi sinh(k) / k) - k coth(k) + 1
        log_sinh = kappa + math.log1p(-math.exp(-2 * kappa)) - math.log(2)
        log_c = math.log(kappa) - math.log(4 * math.pi) - log_sinh
        coth = 1 / math.tanh(kappa)
        np.testing.assert_allclose(float(dist.log_normalizer()), log_c, rtol=1e-13)
        np.testing.assert_allclose(float(dist.entropy()), -log_c - kappa * coth + 1,
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(dist.mean_resultant_length()),
                                   coth - 1 / kappa, rtol=1e-12)


def test_density_integrates_to_one_on_the_circle():
    with jax.enable_x64(True):
        dist = VonMisesFisher(jnp.array([0.6, 0.8]), jnp.float64(3.0))
        theta = jnp.linspace(0, 2 * math.pi, 20001)[:-1]
        x = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
        total = float(jnp.sum(jnp.exp(dist.log_prob(x))) * (2 * math.pi / theta.size))
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("d, kappa", [(3, 2.0), (64, 50.0), (2048, 1e4)])
def test_samples_are_unit_vectors_with_the_mean_resultant_length(d, kappa):
    n = 4000
    with jax.enable_x64(True):
        mu = _unit(jax.random.key(1), d)
        dist = VonMisesFisher(mu, jnp.float64(kappa))
        x = jax.jit(lambda k: dist.sample(k, (n,)))(jax.random.key(2))
        assert x.shape == (n, d)
        np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), 1.0, rtol=1e-10)
        w = np.asarray(x @ mu)
        a = float(dist.mean_resultant_length())
        resid = np.asarray(jnp.mean(x - (x @ mu)[:, None] * mu, axis=0))
    se = float(np.std(w)) / math.sqrt(n)
    assert abs(float(np.mean(w)) - a) < 5 * se + 1e-12
    # the part orthogonal to mu has no preferred direction
    assert float(np.linalg.norm(resid)) < 5 * math.sqrt((1 - a * a) / n) + 1e-12


@pytest.mark.slow
def test_large_dimension_and_concentration_stay_finite_with_gradients():
    with jax.enable_x64(True):
        mu = _unit(jax.random.key(3), 32768)
        for kappa in (10.0, 1e4, 1e6):
            dist = VonMisesFisher(mu, jnp.float64(kappa))
            assert np.isfinite(float(dist.log_normalizer())), kappa
            assert np.isfinite(float(dist.entropy())), kappa
            a = float(dist.mean_resultant_length())
            assert 0 < a < 1

        def nll(log_kappa, x):
            return -jnp.mean(VonMisesFisher(mu, jnp.exp(log_kappa)).log_prob(x))

        x = VonMisesFisher(mu, jnp.float64(2e4)).sample(jax.random.key(4), (64,))
        g = jax.grad(nll)(jnp.log(2e4), x)
        h = 1e-6
        fd = (nll(jnp.log(2e4) + h, x) - nll(jnp.log(2e4) - h, x)) / (2 * h)
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-5, atol=1e-6)


def test_one_dimensional_mu_is_refused():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        VonMisesFisher(jnp.ones((1,)), 1.0)
