"""The precision transforms compute in: float32 for float32 and narrower inputs (bfloat16,
float16), float64 for float64 inputs (which exist only with ``jax_enable_x64`` on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["compute_dtype", "upcast"]


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """``float32``, or ``float64`` when ``x`` is float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in :func:`compute_dtype`."""
    return x.astype(compute_dtype(x))
