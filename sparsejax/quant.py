"""Low-precision transforms: the denoising affine transform (DAT) and classic baselines.

Pure, jit-safe functions of arrays (the methods built on them, one spec class each, are in
``sparsejax.transforms.quant``) (bfloat16 / float32 / float64 in, same dtype out;
statistics in float32, or float64 for float64 inputs). Formulas: ``docs/methods.md``
sections 3-4.

* :func:`denoise_quant` - Ye et al. 2024 (arXiv 2409.09245): quantisation as additive,
  stopped-gradient noise on the integer grid, then a ridge-regression dequantiser
  ``x_hat = s_g * q + b_g`` whose parameters are differentiable functions of ``x`` (the
  "corrective gradient path"). Built from :func:`quantize` and :func:`ridge_dequant`.
* Baselines: :func:`absmax_ste`, :func:`lsq` (LSQ, Esser et al. 2020; the learned-step layer
  is ``sparsejax.transforms.quant.LSQ``), :func:`stochastic_round`, :func:`fp8` / :func:`fp8_ste`.

Everything here is *simulated* quantisation: values are rounded onto the low-precision
grid, arithmetic stays in the input precision.

Blocks
    Statistics (grid range, ridge moments) are taken per block of ``block_size``
    consecutive entries along ``axis`` - the contracting axis of the matmul that consumes
    the tensor (axis 0 of a Flax ``(in, out)`` kernel, axis -1 of activations) - separately
    for every index of the other axes (sub-channel quantisation). A length that is not a
    multiple of ``block_size`` is **padded and masked**: the last block is smaller, and the
    padding enters no statistic. A length shorter than ``block_size`` is one block.
    Per-block outputs (``s_f``, ``b_f``, ``s_g``, ``b_g``) have the shape of ``x`` with
    ``axis`` replaced by the number of blocks.

Bits
    An integer 1..8, or 1.5 for ternary. Affine form: grid ``0 .. L-1`` (``L = 2**bits``
    levels, 3 for ternary) spanning the block's [min, max]. Linear form: symmetric grid
    ``-Q .. Q`` with ``Q = 2**(bits-1) - 1`` and ``s_f = max|x| / Q`` for bits >= 2;
    ternary ``{-1, 0, 1}`` and 1-bit ``sign(x)`` take ``s_f = mean|x|`` (BitNet b1.58 /
    XNOR-Net scaling: absmax would round most of a Gaussian block to 0). ``sign(0) = 0``:
    an exact zero - a pruned weight - stays 0, so linear forms keep N:M sparsity (real
    inputs are otherwise never exactly 0, and a pruned zero costs no storage bit).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.dtypes import compute_dtype, upcast
from sparsejax.estimators import straight_through
from sparsejax.sparsity import ste

__all__ = [
    "FP8_FORMATS",
    "STAT_NAMES",
    "TERNARY",
    "absmax_ste",
    "absmax_with_stats",
    "check_bits",
    "denoise_quant",
    "denoise_with_stats",
    "fp8",
    "fp8_ste",
    "fp8_with_stats",
    "lsq",
    "lsq_init_step",
    "lsq_range",
    "lsq_with_stats",
    "quantize",
    "ridge_dequant",
    "stochastic_round",
]

FP8_FORMATS = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
TERNARY = 1.5
# The diagnostics every quantiser reports (``*_with_stats``).
STAT_NAMES = ("mse_naive", "mse", "scale", "clip_frac")

sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------- checks


def check_bits(bits: float) -> float:
    """``bits`` as a float; raises ``ValueError`` unless it is an integer 1..8 or 1.5."""
    try:
        b = float(bits)
    except (TypeError, ValueError):
        raise ValueError(f"bits={bits!r}: expected an integer 1..8 or 1.5 (ternary)") from None
    if not (b == TERNARY or (b.is_integer() and 1 <= b <= 8)):
        raise ValueError(f"bits={bits!r}: expected an integer 1..8 or 1.5 (ternary)")
    return b


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) \
            or block_size <= 0:
        raise ValueError(f"block_size={block_size!r}: expected a positive integer")


def _check_lam(lam: float) -> None:
    if not lam >= 0:  # also rejects NaN
        raise ValueError(f"lam={lam!r}: the ridge penalty must be >= 0")


def _levels(bits: float) -> int:
    return 3 if bits == TERNARY else 2 ** int(bits)


def _grid(bits: float, affine: bool) -> tuple[int, int]:
    """Smallest and largest integer of the grid."""
    if affine:
        return 0, _levels(bits) - 1
    if bits <= TERNARY:
        return -1, 1
    q = 2 ** (int(bits) - 1) - 1
    return -q, q


# --------------------------------------------------------------------------- blocks


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sums(vs: tuple[jax.Array, ...], axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Sums of several same-shape arrays over ``axes`` in one variadic reduction: XLA emits
    one loop reading all operands, where separate sums are separate passes over memory."""
    # initial values typed like the operands (a Python 0.0 is float64 under jax_enable_x64)
    return jax.lax.reduce(tuple(vs), tuple(jnp.zeros((), v.dtype) for v in vs),
                          lambda a, b: tuple(u + w for u, w in zip(a, b, strict=True)), axes)


@_sums.defjvp
def _sums_jvp(axes, primals, tangents):
    # linear: the tangent is the sum of the tangents (plain sums, which JAX can transpose)
    return _sums(primals[0], axes), tuple(jnp.sum(t, axes) for t in tangents[0])


@jax.custom_jvp
def _min_max(lo_v: jax.Array, hi_v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(min(lo_v), max(hi_v))`` over the last axis in one pass. No gradient: used for
    the quantisation grid, which is a constant (see :func:`quantize`)."""
    inits = (jnp.array(jnp.inf, lo_v.dtype), jnp.array(-jnp.inf, hi_v.dtype))
    return jax.lax.reduce((lo_v, hi_v), inits,
                          lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
                          (lo_v.ndim - 1,))


@_min_max.defjvp
def _min_max_jvp(primals, tangents):
    out = _min_max(*primals)
    return out, tuple(jnp.zeros_like(o) for o in out)


@dataclass(frozen=True)
class _Layout:
    """How ``x`` is cut into blocks: ``(..., n_blocks, block)`` with the block axis last."""

    axis: int
    length: int
    n_blocks: int
    block: int
    # (n_blocks, block) valid entries, None when nothing is padded; a function of the fields
    # above, so left out of hashing (the layout is a static argument of a custom_vjp)
    mask: np.ndarray | None = field(default=None, compare=False)

    def to_blocks(self, x: jax.Array) -> jax.Array:
        x = jnp.moveaxis(x, self.axis, -1)
        pad = self.n_blocks * self.block - self.length
        if pad:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        return x.reshape(*x.shape[:-1], self.n_blocks, self.block)

    def from_blocks(self, xb: jax.Array) -> jax.Array:
        x = xb.reshape(*xb.shape[:-2], -1)[..., :self.length]
        return jnp.moveaxis(x, -1, self.axis)

    def per_block(self, stat: jax.Array) -> jax.Array:
        """``(..., n_blocks, 1)`` -> the shape of ``x`` with ``axis`` replaced by blocks."""
        return jnp.moveaxis(stat[..., 0], -1, self.axis)

    def means(self, *vs: jax.Array) -> tuple[jax.Array, ...]:
        """Means over each block's valid entries, ``(..., n_blocks, 1)`` each, from one
        variadic reduction (one loop over the data instead of one per statistic)."""
        if self.mask is not None:
            vs = tuple(jnp.where(self.mask, v, 0.0) for v in vs)
        count = self.block if self.mask is None else self.mask.sum(-1)
        sums = _sums(vs, (vs[0].ndim - 1,))
        return tuple((t / count)[..., None] for t in sums)

    def totals(self, *vs: jax.Array) -> tuple[jax.Array, ...]:
        """Means over all valid entries (scalars), from one variadic reduction."""
        if self.mask is not None:
            vs = tuple(jnp.where(self.mask, v, 0.0) for v in vs)
        sums = _sums(vs, tuple(range(vs[0].ndim)))
        size = vs[0].size // (self.n_blocks * self.block) * self.length
        return tuple(t / size for t in sums)

    def min_max(self, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Block min and max over valid entries, ``(..., n_blocks, 1)``, in one pass."""
        lo_v, hi_v = ((v, v) if self.mask is None else
                      (jnp.where(self.mask, v, jnp.inf), jnp.where(self.mask, v, -jnp.inf)))
        lo, hi = _min_max(lo_v, hi_v)
        return lo[..., None], hi[..., None]


def _layout(x: jax.Array, block_size: int, axis: int) -> _Layout:
    _check_block_size(block_size)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"cannot quantise an empty array (shape {tuple(x.shape)}): blocks "
                         "need at least one entry")
    axis = axis % x.ndim
    length = x.shape[axis]
    block = min(block_size, length)
    n_blocks = -(-length // block)
    mask = None
    if n_blocks * block != length:
        mask = (np.arange(n_blocks * block) < length).reshape(n_blocks, block)
    return _Layout(axis, length, n_blocks, block, mask)


# --------------------------------------------------------------------------- DAT


def _quantize_blocks(xb: jax.Array, lay: _Layout, bits: float, affine: bool):
    """Pre-transform and rounding of blocked ``xb`` ``(..., n_blocks, block)`` (float32 or float64).

    Returns ``(q, q_int, s_f, b_f, clipped)``: ``q = f(x) + stop_gradient(delta)`` (value
    ``q_int``, gradient of ``f``), the grid integers, the per-block pre-transform
    ``(..., n_blocks, 1)`` (no gradient: min/max/absmax are treated as constants, see
    :func:`quantize`), and where rounding fell outside the grid.
    """
    lo, hi = _grid(bits, affine)
    xs = sg(xb)
    if affine:
        b_f, top = lay.min_max(xs)
        s_f = (top - b_f) / (hi - lo)
    else:
        b_f = jnp.zeros(xb.shape[:-1] + (1,), xb.dtype)
        s_f = (lay.means(jnp.abs(xs))[0] if bits <= TERNARY
               else lay.min_max(jnp.abs(xs))[1] / hi)
    s_f = jnp.where(s_f > 0, s_f, 1.0)  # constant / all-zero block: any scale works
    f = (xb - b_f) / s_f
    rounded = jnp.sign(f) if (bits == 1 and not affine) else jnp.round(f)
    q_int = jnp.clip(rounded, lo, hi)
    q = straight_through(f, q_int)  # exactly the grid integers, the gradient of f
    return q, q_int, s_f, b_f, rounded != q_int


def _ridge_blocks(xb: jax.Array, q: jax.Array, lay: _Layout, lam: float, affine: bool,
                  shifts: tuple[jax.Array, jax.Array] | None = None):
    """Per-block ridge fit of ``x ~ s_g q + b_g`` (docs/methods.md §3), population moments.

    ``s_g = Cov(x, q) / (Var(q) + lam)``, ``b_g = mean(x) - s_g mean(q)``; linear form
    ``s_g = mean(q x) / (mean(q^2) + lam)``, ``b_g = 0``. A zero denominator (constant
    ``q`` with ``lam = 0``) gives ``s_g = 0``, ``b_g = mean(x)`` instead of NaN.
    Returns ``(s_g, b_g, mean_q, inv)`` per block, ``inv = 1 / (Var(q) + lam)`` (or 0).

    The four means come from one pass (one variadic reduction; the two-pass centred form
    cost ~50% more on CPU). The affine form stays accurate by shifting ``x`` and ``q`` by
    per-block constants first (the moments are shift-invariant): ``shifts``, or by default
    each block's first entry.
    """
    if affine:
        shift_x, shift_q = shifts if shifts is not None else (xb[..., :1], q[..., :1])
        shift_x, shift_q = sg(shift_x), sg(shift_q)
        xc, qc = xb - shift_x, q - shift_q
        mean_xc, mean_qc, mean_xq, mean_qq = lay.means(xc, qc, xc * qc, qc * qc)
        cov = mean_xq - mean_xc * mean_qc
        var = jnp.maximum(mean_qq - mean_qc * mean_qc, 0.0)
        mean_x, mean_q = mean_xc + shift_x, mean_qc + shift_q
    else:
        mean_x = mean_q = jnp.zeros(xb.shape[:-1] + (1,), xb.dtype)
        cov, var = lay.means(xb * q, q * q)
    denom = var + lam
    ok = denom > 0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, denom, 1.0), 0.0)
    s_g = cov * inv
    return s_g, mean_x - s_g * mean_q, mean_q, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _denoised(xb: jax.Array, q: jax.Array, shift_x: jax.Array, shift_q: jax.Array,
              lay: _Layout, lam: float, affine: bool) -> jax.Array:
    """``x_hat = s_g q + b_g`` per block, with ``(s_g, b_g)`` the ridge fit of ``xb`` on
    ``q`` (shifted by the per-block constants ``shift_x``, ``shift_q`` for accuracy) -
    differentiable in both ``xb`` and ``q`` (the corrective path). Its VJP is written out
    below: autodiff of the moments took 2/3 of a DAT layer's step time on CPU."""
    s_g, b_g, _, _ = _ridge_blocks(xb, q, lay, lam, affine, (shift_x, shift_q))
    return s_g * q + b_g


def _denoised_fwd(xb, q, shift_x, shift_q, lay, lam, affine):
    s_g, b_g, mean_q, inv = _ridge_blocks(xb, q, lay, lam, affine, (shift_x, shift_q))
    return s_g * q + b_g, (xb, q, s_g, b_g + s_g * mean_q, mean_q, inv, shift_x, shift_q)


def _denoised_bwd(lay, lam, affine, res, g):
    """With ``d = q - mean_q`` (``q`` in the linear form), ``A = sum(g d)``,
    ``G = sum(g)`` per block of ``N`` entries (``mean_x`` and the ``G`` terms only in the
    affine form):

        dx_i = (A inv d_i + G) / N
        dq_i = s_g g_i + A inv (x_i - mean_x) / N - 2 A s_g inv d_i / N - s_g G / N
    """
    xb, q, s_g, mean_x, mean_q, inv, shift_x, shift_q = res
    d = q - mean_q
    if affine:
        a_n, g_n = lay.means(g * d, g)  # padding: g = 0 there (sliced away downstream)
    else:
        (a_n,) = lay.means(g * d)
    a_inv_n = a_n * inv
    dx = a_inv_n * d
    dq = s_g * g + a_inv_n * ((xb - mean_x) - 2.0 * s_g * d)
    if affine:
        dx = dx + g_n
        dq = dq - s_g * g_n
    return dx, dq, jnp.zeros_like(shift_x), jnp.zeros_like(shift_q)


_denoised.defvjp(_denoised_fwd, _denoised_bwd)


def quantize(x: jax.Array, bits: float, *, affine: bool = True, block_size: int = 128,
             axis: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-transform onto the integer grid and round, per block (docs/methods.md §3).

    ``f(x) = (x - b_f) / s_f`` (affine; ``b_f`` = block min, ``s_f`` = range / (L - 1)) or
    ``x / s_f`` (linear); ``q = f(x) + stop_gradient(clip(round(f(x))) - f(x))``.

    Returns ``(q, s_f, b_f)``: ``q`` of ``x``'s shape holding grid integers (its gradient
    is that of ``f``); ``s_f``, ``b_f`` per block; all float32 (float64 for float64 ``x``).
    ``s_f`` and ``b_f`` carry no gradient (choice: the block min/max has a one-entry
    subgradient, and the ridge fit downstream re-fits any affine change of ``q``).
    """
    bits = check_bits(bits)
    lay = _layout(x, block_size, axis)
    q, _, s_f, b_f, _ = _quantize_blocks(lay.to_blocks(upcast(x)), lay, bits,
                                         affine)
    return lay.from_blocks(q), lay.per_block(s_f), lay.per_block(b_f)


def ridge_dequant(x: jax.Array, q: jax.Array, *, lam: float = 0.01, affine: bool = True,
                  block_size: int = 128, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """The denoising dequantiser's ``(s_g, b_g)`` per block: the minimiser of
    ``(1/2N) ||s_g q + b_g - x||^2 + (lam/2) s_g^2`` (docs/methods.md §3). Differentiable in
    both ``x`` and ``q``; float32 (float64 for float64 ``x``), per-block shape."""
    _check_lam(lam)
    if q.shape != x.shape:
        raise ValueError(f"ridge_dequant: q has shape {q.shape}, x has {x.shape}")
    lay = _layout(x, block_size, axis)
    s_g, b_g, _, _ = _ridge_blocks(lay.to_blocks(upcast(x)),
                                   lay.to_blocks(q.astype(compute_dtype(x))), lay, lam,
                                   affine)
    return lay.per_block(s_g), lay.per_block(b_g)


def denoise_with_stats(x: jax.Array, bits: float, affine: bool, lam: float, block_size: int,
                       axis: int, nm: tuple[int, int] | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`denoise_quant` and its diagnostics (see :data:`STAT_NAMES`): ``mse_naive``
    (dequantised with the pre-transform's own scale, ``s_f q + b_f``: before denoising),
    ``mse`` (what the layer uses), ``scale`` (mean ``s_g``), ``clip_frac``; float32
    (float64 for float64 ``x``), no gradient."""
    bits = check_bits(bits)
    _check_lam(lam)
    x32 = upcast(x)
    source = ste(x32, nm[0], nm[1], axis) if nm is not None else x32  # x_S = x + sg(P(x) - x)
    lay = _layout(x, block_size, axis)
    xb = lay.to_blocks(x32)
    q, q_int, s_f, b_f, clipped = _quantize_blocks(lay.to_blocks(source), lay, bits, affine)
    # Shift x by the grid's origin and q by the grid's midpoint: well-conditioned moments.
    shifts = (b_f, jnp.full_like(b_f, sum(_grid(bits, affine)) / 2))
    xb_hat = _denoised(xb, q, *shifts, lay, lam, affine)  # denoise the total noise back to x
    s_g = _ridge_blocks(xb, q, lay, lam, affine, shifts)[0]
    errors = lay.totals(jnp.square(s_f * q_int + b_f - xb), jnp.square(xb_hat - xb),
                        clipped.astype(x32.dtype))
    stats = dict(zip(("mse_naive", "mse", "clip_frac"), errors, strict=True))
    stats["scale"] = jnp.mean(s_g)
    return lay.from_blocks(xb_hat).astype(x.dtype), jax.tree.map(sg, stats)


def denoise_quant(x: jax.Array, bits: float, *, affine: bool = True, lam: float = 0.01,
                  block_size: int = 128, axis: int = 0,
                  nm: tuple[int, int] | None = None) -> jax.Array:
    """The denoising affine transform of docs/methods.md §3; same shape and dtype as x.

    1. optional hard N:M prune along ``axis`` as stopped-gradient noise,
       ``x_S = x + stop_gradient(prune(x) - x)``;
    2. ``q = f(x_S) + stop_gradient(delta)`` (:func:`quantize`);
    3. ``x_hat = s_g * q + b_g`` with ``(s_g, b_g)`` the ridge fit of ``x`` on ``q``
       (:func:`ridge_dequant`), gradients flowing through ``s_g`` and ``b_g``.

    The fit's target is the unpruned ``x``: pruning and rounding are one noise term that
    the affine map denoises. In the linear form (the paper's choice for sparsity) pruned
    entries have ``q = 0`` and stay exactly 0.
    """
    return denoise_with_stats(x, bits, affine, lam, block_size, axis, nm)[0]


# --------------------------------------------------------------------------- baselines


def absmax_with_stats(x: jax.Array, bits: float, block_size: int | None, axis: int
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`absmax_ste` and its diagnostics (``mse_naive`` = ``mse``, ``scale`` = mean
    ``s_f``, ``clip_frac``)."""
    bits = check_bits(bits)
    x32 = upcast(x)
    if block_size is None:  # one scale for the whole tensor
        flat = x32.reshape(1, -1)
        out, stats = absmax_with_stats(flat, bits, flat.shape[1], 1)
        return out.reshape(x.shape).astype(x.dtype), stats
    lay = _layout(x32, block_size, axis)
    _, q_int, s_f, _, clipped = _quantize_blocks(lay.to_blocks(x32), lay, bits, affine=False)
    value = lay.from_blocks(q_int * s_f)
    mse = jnp.mean(jnp.square(value - x32))
    stats = {"mse_naive": mse, "mse": mse, "scale": jnp.mean(s_f),
             "clip_frac": jnp.mean(lay.from_blocks(clipped.astype(x32.dtype)))}
    return straight_through(x32, value).astype(x.dtype), jax.tree.map(sg, stats)


def absmax_ste(x: jax.Array, bits: float, *, block_size: int | None = 128,
               axis: int = 0) -> jax.Array:
    """Symmetric quantise-dequantise ``clip(round(x / s)) * s`` with an identity gradient
    (docs/methods.md §4), ``s = max|x| / Q`` per block (``block_size=None``: per tensor); ternary
    and 1-bit use ``s = mean|x|`` (module docstring). Same shape and dtype as ``x``."""
    return absmax_with_stats(x, bits, block_size, axis)[0]


def lsq_range(bits: float) -> tuple[int, int]:
    """``(Q_n, Q_p)`` of signed LSQ: ``(2^(b-1), 2^(b-1) - 1)``; ternary ``(1, 1)``."""
    bits = check_bits(bits)
    if bits == 1:
        raise ValueError("bits=1: LSQ needs bits >= 1.5 (its signed 1-bit grid {-1, 0} "
                         "has no positive level)")
    if bits == TERNARY:
        return 1, 1
    return 2 ** (int(bits) - 1), 2 ** (int(bits) - 1) - 1


def lsq(x: jax.Array, step: jax.Array, bits: float, *, grad_scale: float = 1.0) -> jax.Array:
    """LSQ (Esser et al. 2020): ``v = s * round(clip(x / s, -Q_n, Q_p))`` with a learned
    step ``s`` (scalar) whose gradient is multiplied by ``grad_scale`` (the paper's
    ``1 / sqrt(N Q_p)``). Gradient to ``x``: 1 inside the clip range, 0 outside."""
    qn, qp = lsq_range(bits)
    step = upcast(step)
    s = straight_through(step * grad_scale, step)  # value s, gradient * grad_scale
    v = jnp.clip(upcast(x) / s, -qn, qp)
    return (straight_through(v, jnp.round(v)) * s).astype(x.dtype)


def lsq_with_stats(x: jax.Array, step: jax.Array, bits: float, grad_scale: float = 1.0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`lsq` and its diagnostics (``scale`` = the learned step)."""
    out = lsq(x, step, bits, grad_scale=grad_scale)
    qn, qp = lsq_range(bits)
    x32 = upcast(x)
    v = sg(x32) / sg(step)
    mse = jnp.mean(jnp.square(upcast(sg(out)) - x32))
    stats = {"mse_naive": mse, "mse": mse, "scale": sg(step).astype(x32.dtype),
             "clip_frac": jnp.mean(((jnp.round(v) < -qn) | (jnp.round(v) > qp))
                                   .astype(x32.dtype))}
    return out, stats


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
    """``round(x + u)``, ``u ~ U(-0.5, 0.5)``: unbiased (``E = x``), identity gradient."""
    x32 = upcast(x)
    u = jax.random.uniform(key, x.shape, x32.dtype, -0.5, 0.5)
    return straight_through(x, jnp.round(x32 + u).astype(x.dtype))


def fp8(x: jax.Array, fmt: str = "e4m3", axis: int | None = None) -> jax.Array:
    """Round ``x`` onto the FP8 grid of ``fmt`` after scaling its amax - over the whole
    tensor, or along ``axis`` (one scale per slice) - to the format's largest finite
    value; same shape and dtype as ``x``. Not differentiable by itself (use
    :func:`fp8_ste`, or where a custom gradient is defined)."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format '{fmt}' is not one of {'|'.join(FP8_FORMATS)}")
    dtype = FP8_FORMATS[fmt]
    x32 = upcast(x)
    amax = jnp.max(jnp.abs(x32), axis=axis, keepdims=axis is not None)
    scale = jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)
    q = (x32 / scale).astype(dtype).astype(x32.dtype)
    return (q * scale).astype(x.dtype)


def fp8_ste(x: jax.Array, fmt: str = "e4m3", axis: int | None = None) -> jax.Array:
    """:func:`fp8` forward, identity gradient."""
    return straight_through(x, fp8(x, fmt, axis))


def fp8_with_stats(x: jax.Array, fmt: str = "e4m3") -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`fp8_ste` and its diagnostics (``scale`` = the amax scale; nothing clips)."""
    out = fp8_ste(x, fmt)
    x32 = upcast(x)
    mse = jnp.mean(jnp.square(upcast(sg(out)) - x32))
    amax = jnp.max(jnp.abs(x32)) / float(jnp.finfo(FP8_FORMATS[fmt]).max)
    return out, jax.tree.map(sg, {"mse_naive": mse, "mse": mse, "scale": amax,
                                  "clip_frac": jnp.zeros((), x32.dtype)})


def lsq_init_step(x_abs_mean: float, bits: float) -> float:
    """LSQ's initial step ``2 E|x| / sqrt(Q_p)``."""
    return 2.0 * x_abs_mean / math.sqrt(lsq_range(bits)[1])
