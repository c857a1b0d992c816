"""L-Mul: floating-point multiplication by integer addition (Luo & Sun, "Addition is All
You Need for Energy-efficient Language Models", arXiv 2410.00907; no official code - the
paper is the reference).

For ``x = (-1)^s (1 + x_m) 2^(x_e)`` the paper's L-Mul is
``(-1)^(s_x xor s_y) (1 + x_m + y_m + 2^(-l(m))) 2^(x_e + y_e)``, ``l(m) = m`` for
``m <= 3``, 3 for ``m = 4``, 4 for ``m > 4``: the mantissa product ``x_m y_m`` is replaced
by a constant. Computed, as the paper proposes, by one integer addition of the bit
patterns: ``bits(|x|) + bits(|y|) - bits(1.0) + 2^(23 - l(m))`` in float32's layout.

Semantics, as computed here (float32 in, float32 out; every result has at most ``m``
mantissa bits):

- the operands are first rounded to ``m`` mantissa bits (round to nearest, ties to even;
  float32's exponent range), which is the ``m``-bit format the method runs in;
- the mantissa sum ``t = x_m + y_m + 2^(-l)`` carries its integer part into the exponent
  (integer addition does this by itself): the result is
  ``(1 + frac(t)) 2^(x_e + y_e + floor(t))``. For ``t < 1`` that is the paper's
  ``(1 + t) 2^(x_e + y_e)``; for ``1 <= t < 2`` it is ``2 t 2^(x_e + y_e)`` - Mitchell's
  approximation - where the formula read literally gives ``(1 + t) 2^(x_e + y_e)``; with
  ``m > 4`` (``l = 4 < m``) ``t`` can reach 2 and carries twice;
- zeros: a zero operand gives a zero with the sign ``s_x xor s_y``; subnormal operands
  and results are flushed to (signed) zero; a result beyond float32's range is ``inf``;
  ``inf`` times a non-zero is ``inf``, ``inf * 0`` and NaN operands give NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["lmul", "lmul_matmul", "lmul_offset_bits", "round_mantissa"]

_MANT = 23  # float32 mantissa bits
# numpy scalars, not jnp: a jnp constant at import time starts the XLA backend, after
# which jax.distributed.initialize refuses to run (multi-process training).
_EXP_MASK = np.uint32(0x7F800000)
_ABS_MASK = np.uint32(0x7FFFFFFF)
_SIGN_MASK = np.uint32(0x80000000)
_ONE = np.uint32(0x3F800000)  # bits of 1.0: the exponent bias in place


def lmul_offset_bits(mantissa_bits: int) -> int:
    """``l(m)``: the offset ``2^(-l(m))`` that stands in for ``x_m y_m`` (paper, Eq. 2)."""
    if mantissa_bits < 1:
        raise ValueError(f"mantissa_bits must be >= 1, got {mantissa_bits}")
    return mantissa_bits if mantissa_bits <= 3 else (3 if mantissa_bits == 4 else 4)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _float(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def round_mantissa(x: jax.Array, mantissa_bits: int) -> jax.Array:
    """``x`` (float32) rounded to ``mantissa_bits`` mantissa bits, to nearest with ties to
    even, by integer operations on its bits (a carry moves into the exponent; a finite
    value may round to ``inf``). Subnormals are flushed to signed zero."""
    if not 0 <= mantissa_bits <= _MANT:
        raise ValueError(f"mantissa_bits must be in [0, {_MANT}], got {mantissa_bits}")
    bits = _bits(x)
    exponent = bits & _EXP_MASK
    finite = exponent != _EXP_MASK
    drop = _MANT - mantissa_bits
    if drop:
        lsb = (bits >> drop) & jnp.uint32(1)
        rounded = (bits + jnp.uint32((1 << (drop - 1)) - 1) + lsb) & ~jnp.uint32((1 << drop) - 1)
        bits = jnp.where(finite, rounded, bits)
    bits = jnp.where(exponent == 0, bits & _SIGN_MASK, bits)  # flush subnormals
    return _float(bits)


def lmul(x: jax.Array, y: jax.Array, mantissa_bits: int) -> jax.Array:
    """Elementwise L-Mul of ``x`` and ``y`` (broadcast; float32) with ``mantissa_bits``
    mantissa bits (module docstring for the exact semantics). Bit-exact, jit-able; no
    gradient (wrap it with a straight-through estimator to train through it)."""
    offset = jnp.uint32(1 << (_MANT - lmul_offset_bits(mantissa_bits)))
    x, y = jnp.broadcast_arrays(round_mantissa(x, mantissa_bits),
                                round_mantissa(y, mantissa_bits))
    bx, by = _bits(x), _bits(y)
    sign = (bx ^ by) & _SIGN_MASK
    ax, ay = bx & _ABS_MASK, by & _ABS_MASK
    total = ax + ay  # < 2^32: no wrap for finite operands
    # below the smallest normal (exponent field <= 0) -> flushed to zero
    underflow = total < _ONE + jnp.uint32(0x00800000) - offset
    result = total - _ONE + offset
    overflow = (total >= _ONE) & (result >= _EXP_MASK)
    mag = jnp.where(underflow, jnp.uint32(0), jnp.where(overflow, _EXP_MASK, result))
    zero = (ax == 0) | (ay == 0)
    inf = (ax == _EXP_MASK) | (ay == _EXP_MASK)
    nan = (ax > _EXP_MASK) | (ay > _EXP_MASK) | (inf & zero)
    mag = jnp.where(zero, jnp.uint32(0), mag)
    mag = jnp.where(inf, _EXP_MASK, mag)
    out = _float(sign | mag)
    return jnp.where(nan, jnp.nan, out)


def lmul_matmul(a: jax.Array, b: jax.Array, mantissa_bits: int, k_tile: int = 16
                ) -> jax.Array:
    """``a @ b`` with every product an L-Mul (:func:`lmul`) and the sums in float32, with
    ``jnp.matmul``'s shapes: ``a`` ``(..., M, K)`` (or ``(..., K)`` with a 2-D ``b``),
    ``b`` ``(K, N)`` or ``(..., K, N)`` (batch axes broadcast). Tiled over K (``k_tile``
    at a time, accumulated by ``lax.scan``) so that only a ``(..., M, k_tile, N)`` block
    of products exists at once, never the whole ``(..., M, K, N)``."""
    if b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"lmul_matmul: a (..., K) and b (..., K, N), got {a.shape} and "
                         f"{b.shape}")
    if a.ndim == 1:
        return lmul_matmul(a[None], b, mantissa_bits, k_tile)[..., 0, :]
    k = a.shape[-1]
    tiles = -(-k // k_tile)
    pad = tiles * k_tile - k
    a = jnp.pad(a.astype(jnp.float32), [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b.astype(jnp.float32), [(0, 0)] * (b.ndim - 2) + [(0, pad), (0, 0)])
    # (tiles, ..., M, kt) and (tiles, ..., kt, N); padding multiplies 0 by 0
    a_tiles = jnp.moveaxis(a.reshape(*a.shape[:-1], tiles, k_tile), -2, 0)
    b_tiles = jnp.moveaxis(b.reshape(*b.shape[:-2], tiles, k_tile, b.shape[-1]), -3, 0)

    def step(acc, operands):
        a_tile, b_tile = operands
        products = lmul(a_tile[..., :, None], b_tile[..., None, :, :], mantissa_bits)
        return acc + products.sum(axis=-2), None

    shape = jnp.broadcast_shapes(a.shape[:-1] + (1,), b.shape[:-2] + (1, b.shape[-1]))
    out, _ = jax.lax.scan(step, jnp.zeros(shape, jnp.float32), (a_tiles, b_tiles))
    return out
