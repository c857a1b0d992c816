"""Rotary position embeddings (RoFormer, Su et al. 2021), in the layout of Hugging Face's
Llama (``rotate_half``: the two halves of the head dimension pair up), with the "llama3"
frequency scaling of Llama 3.1+.

``inv_freq_j = theta^(-2j / D)`` for ``j < D / 2``; a position ``p`` rotates the pair
``(x_j, x_{j + D/2})`` by the angle ``p * inv_freq_j``:
``x * cos(p f) + rotate_half(x) * sin(p f)`` with ``f = [inv_freq, inv_freq]`` and
``rotate_half([a, b]) = [-b, a]``.

"llama3" scaling (Meta's Llama 3.1 release; ``transformers``' ``_compute_llama3_parameters``):
with wavelengths ``w = 2 pi / inv_freq``, the original context ``L``, ``factor`` ``s``,
``low = L / low_freq_factor`` and ``high = L / high_freq_factor``: frequencies of
``w > low`` are divided by ``s``, those of ``w < high`` kept, and those between
interpolated, ``(1 - a) f / s + a f`` with ``a = (L / w - low_freq_factor) /
(high_freq_factor - low_freq_factor)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Rotary", "apply_rotary", "rotary_frequencies"]


@dataclass(frozen=True)
class Rotary:
    """The settings of a model's rotary embedding (static, hashable). ``scaling``:
    ``none`` or ``llama3`` (with ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_context``)."""

    head_dim: int
    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


def rotary_frequencies(rotary: Rotary) -> np.ndarray:
    """``inv_freq`` ``(D / 2,)`` (float64 numpy, exact), scaled as ``rotary`` asks."""
    d = rotary.head_dim
    inv_freq = 1.0 / (rotary.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if rotary.scaling == "none":
        return inv_freq
    if rotary.scaling != "llama3":
        raise ValueError(f"rotary scaling '{rotary.scaling}' is not one of none|llama3")
    context, s = rotary.original_context, rotary.factor
    low_wavelen = context / rotary.low_freq_factor
    high_wavelen = context / rotary.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s, inv_freq)
    smooth = ((context / wavelen - rotary.low_freq_factor)
              / (rotary.high_freq_factor - rotary.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rotary(x: jax.Array, positions: jax.Array, rotary: Rotary) -> jax.Array:
    """``x`` ``(B, T, H, D)`` rotated by the positions ``(T,)`` (angles in float32, as
    ``transformers`` computes them); same dtype as ``x``."""
    inv_freq = jnp.asarray(rotary_frequencies(rotary), jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]  # (1, T, 1, D)
    x32 = x.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
