"""The straight-through estimator, exact in the forward pass.

The usual ``x + stop_gradient(value - x)`` returns ``value`` only up to rounding: with
``x = 5`` and ``value = 1.1`` in float32 it gives 1.0999999, one step off the quantisation
grid. :func:`straight_through` returns ``value`` bit for bit and passes the gradient of
``x`` through unchanged (a ``custom_jvp``, so it works in forward and reverse mode).
"""

from __future__ import annotations

import jax

__all__ = ["straight_through"]


@jax.custom_jvp
def straight_through(x: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` (cast to ``x``'s dtype) forward; backward the gradient flows to ``x`` as
    if the function were the identity, and none to ``value``. Shapes must match."""
    return value.astype(x.dtype)


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    x, value = primals
    return value.astype(x.dtype), tangents[0]
