"""1-bit signed-cut approximations of a matrix (Riasanovsky & El Kazdadi, "Efficient 1-bit
tensor approximations", arXiv 2410.01799; public Rust code ariasanovsky/cuts).

``A ~ sum_{j < w} c_j s_j t_j^T`` with sign vectors ``s_j`` (m,) and ``t_j`` (n,), found
greedily on the residual ``R`` (``R = A`` at first): from a random sign vector ``t``,
alternate ``s <- sign(R t)`` and ``t <- sign(R^T s)`` while the cut value ``s^T R t``
grows (each half-step can only raise it), then ``c = s^T R t / (m n)`` - the least-squares
coefficient of ``s t^T`` - and ``R <- R - c s t^T``, which lowers ``||R||_F^2`` by exactly
``(s^T R t)^2 / (m n)``. Storage: ``w (m + n)`` sign bits plus ``w`` scalars.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SignedCuts", "signed_cut_width", "signed_cuts"]


class SignedCuts(NamedTuple):
    """``A ~ (s * c) @ t.T``: ``c`` (w,), ``s`` (m, w) and ``t`` (n, w) of +-1 (float32),
    and the cut value ``s_j^T R_j t_j`` of each term on its residual (w,)."""

    c: jax.Array
    s: jax.Array
    t: jax.Array
    cut: jax.Array

    def dense(self) -> jax.Array:
        """The approximation ``sum_j c_j s_j t_j^T`` (m, n)."""
        return (self.s * self.c) @ self.t.T


def _sign(x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, 1.0, -1.0).astype(jnp.float32)


def signed_cuts(a: jax.Array, width: int, key: jax.Array | None = None,
                max_iters: int = 100) -> SignedCuts:
    """The greedy signed-cut decomposition of ``a`` (m, n) with ``width`` terms (module
    docstring). ``key`` draws each term's starting ``t`` (default key 0); each term
    alternates at most ``max_iters`` times. Pure JAX, jit-able (``width`` and
    ``max_iters`` static)."""
    a = jnp.asarray(a, jnp.float32)
    if a.ndim != 2:
        raise ValueError(f"signed_cuts takes a matrix, got shape {a.shape}")
    m, n = a.shape
    keys = jax.random.split(jax.random.key(0) if key is None else key, width)

    def term(residual, k):
        t0 = _sign(jax.random.normal(k, (n,)))
        s0 = _sign(residual @ t0)

        def grow(carry):
            s, t, value, _, i = carry
            t_new = _sign(residual.T @ s)
            s_new = _sign(residual @ t_new)
            new_value = s_new @ residual @ t_new
            better = new_value > value
            return (jnp.where(better, s_new, s), jnp.where(better, t_new, t),
                    jnp.maximum(new_value, value), better, i + 1)

        init = (s0, t0, s0 @ residual @ t0, jnp.bool_(True), jnp.int32(0))
        s, t, value, _, _ = jax.lax.while_loop(
            lambda c: c[3] & (c[4] < max_iters), grow, init)
        c = value / (m * n)
        return residual - c * jnp.outer(s, t), (c, s, t, value)

    _, (c, s, t, cut) = jax.lax.scan(term, a, keys)
    return SignedCuts(c, s.T, t.T, cut)


def signed_cut_width(m: int, n: int, bits_per_weight: float, scalar_bits: int = 16) -> int:
    """The number of terms that fit ``bits_per_weight`` for an (m, n) matrix: each term
    stores ``m + n`` sign bits and one ``scalar_bits`` coefficient."""
    return max(1, int(bits_per_weight * m * n // (m + n + scalar_bits)))
