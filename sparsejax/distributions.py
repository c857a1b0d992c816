"""Distributions built on ``sparsejax.special``: the von Mises-Fisher distribution.

``VonMisesFisher(mu, kappa)`` on the unit sphere ``S^{d-1}``:
``p(x) = C_d(kappa) exp(kappa mu^T x)`` with
``log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log(2 pi) - log I_{d/2-1}(kappa)``
(docs/methods.md §6). The Bessel function is evaluated in log space, so the normaliser stays
finite for d in the tens of thousands and kappa up to 1e6 (float64), and gradients with
respect to kappa come from ``log_iv``'s closed-form derivative.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax.special import log_iv

__all__ = ["VonMisesFisher"]


class VonMisesFisher:
    """von Mises-Fisher distribution with mean direction ``mu`` (``(..., d)``, unit norm)
    and concentration ``kappa`` (``(...)``, > 0); batch shapes broadcast."""

    def __init__(self, mu: jax.Array, kappa: jax.Array):
        self.mu = jnp.asarray(mu)
        self.kappa = jnp.asarray(kappa, self.mu.dtype)
        self.dim = self.mu.shape[-1]
        if self.dim < 2:
            raise ValueError(f"mu must have at least 2 dimensions on its last axis, got "
                             f"{self.mu.shape}")

    @property
    def order(self) -> float:
        """The Bessel order ``d/2 - 1`` of the normaliser."""
        return self.dim / 2.0 - 1.0

    def log_normalizer(self) -> jax.Array:
        """``log C_d(kappa)``, shape of ``kappa``."""
        k = self.kappa
        return (self.order * jnp.log(k) - 0.5 * self.dim * math.log(2 * math.pi)
                - log_iv(self.order, k))

    def log_prob(self, x: jax.Array) -> jax.Array:
        """``log p(x)`` for unit vectors ``x`` of shape ``(..., d)``."""
        return self.log_normalizer() + self.kappa * jnp.sum(self.mu * x, axis=-1)

    def mean_resultant_length(self) -> jax.Array:
        """``A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = E[mu^T x]``."""
        return jnp.exp(log_iv(self.order + 1.0, self.kappa) - log_iv(self.order, self.kappa))

    def mean(self) -> jax.Array:
        return self.mean_resultant_length()[..., None] * self.mu

    def entropy(self) -> jax.Array:
        """``-log C_d(kappa) - kappa A_d(kappa)``."""
        return -self.log_normalizer() - self.kappa * self.mean_resultant_length()

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """Samples of shape ``sample_shape + batch + (d,)`` by Wood's (1994) rejection
        sampler for ``w = mu^T x``, a uniform direction orthogonal to ``mu``, and a
        Householder reflection taking ``e_1`` to ``mu``."""
        batch = jnp.broadcast_shapes(self.mu.shape[:-1], self.kappa.shape)
        shape = tuple(sample_shape) + batch
        k_w, k_dir = jax.random.split(key)
        w = _wood_w(k_w, jnp.broadcast_to(self.kappa, shape), self.dim)
        direction = jax.random.normal(k_dir, shape + (self.dim - 1,), self.mu.dtype)
        direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
        along_e1 = jnp.concatenate(
            [w[..., None], jnp.sqrt(jnp.clip(1.0 - w * w, 0.0))[..., None] * direction], -1)
        return _reflect_e1_to(jnp.broadcast_to(self.mu, shape + (self.dim,)), along_e1)


def _wood_w(key: jax.Array, kappa: jax.Array, dim: int) -> jax.Array:
    """``w = mu^T x`` by Wood's algorithm, one accepted draw per element of ``kappa``."""
    m1 = dim - 1.0
    # b = (-2 kappa + sqrt(4 kappa^2 + m1^2)) / m1, written without cancellation
    b = m1 / (2.0 * kappa + jnp.sqrt(4.0 * kappa * kappa + m1 * m1))
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + m1 * jnp.log1p(-x0 * x0)

    def propose(state):
        i, w, done = state
        k_beta, k_u = jax.random.split(jax.random.fold_in(key, i))
        z = jax.random.beta(k_beta, 0.5 * m1, 0.5 * m1, kappa.shape, kappa.dtype)
        u = jax.random.uniform(k_u, kappa.shape, kappa.dtype)
        cand = (1.0 - (1.0 + b) * z) / (1.0 - (1.0 - b) * z)
        accept = kappa * cand + m1 * jnp.log1p(-x0 * cand) - c >= jnp.log(u)
        take = accept & ~done
        return i + 1, jnp.where(take, cand, w), done | accept

    state = (jnp.zeros((), jnp.int32), jnp.zeros_like(kappa),
             jnp.zeros(kappa.shape, bool))
    _, w, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), propose, state)
    return w


def _reflect_e1_to(mu: jax.Array, x: jax.Array) -> jax.Array:
    """Apply the Householder reflection that maps ``e_1`` to ``mu`` to ``x`` (``(..., d)``)."""
    e1 = jnp.zeros_like(mu).at[..., 0].set(1.0)
    u = e1 - mu
    norm2 = jnp.sum(u * u, axis=-1, keepdims=True)
    safe = norm2 > 1e-30  # mu == e1: identity
    u = jnp.where(safe, u / jnp.sqrt(jnp.where(safe, norm2, 1.0)), 0.0)
    return x - 2.0 * jnp.sum(u * x, axis=-1, keepdims=True) * u
