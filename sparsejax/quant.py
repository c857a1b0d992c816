"""Quantisation simulation.

``fp8``: per-tensor amax-scaled FP8 round trip (E4M3 or E5M2), returned in the input dtype
- a *simulation* of FP8 operands (values are rounded onto the FP8 grid, arithmetic stays in
the input precision), as in S-STE's reference code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["FP8_FORMATS", "fp8"]

FP8_FORMATS = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def fp8(x: jax.Array, fmt: str = "e4m3") -> jax.Array:
    """Round ``x`` onto the FP8 grid of ``fmt`` after scaling its amax to the format's
    largest finite value; same shape and dtype as ``x``. Not differentiable by itself (use
    it where a straight-through or custom gradient is defined)."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format '{fmt}' is not one of {'|'.join(FP8_FORMATS)}")
    dtype = FP8_FORMATS[fmt]
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32))
    scale = jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)
    q = (x32 / scale).astype(dtype).astype(jnp.float32)
    return (q * scale).astype(x.dtype)
