"""Packed N:M (2:4) weights and the Pallas matmul that reads them.

Format (``PackedNM``)
---------------------
A weight ``W`` of shape ``(K, N)`` (``y = x @ W``) is N:M sparse along ``K``: each group
of ``m`` consecutive rows of a column holds at most ``n`` non-zeros. ``pack_nm`` stores

* ``values``: ``(n, G, N)`` in ``W``'s dtype, ``G = K/m`` groups padded up to a multiple
  of 32: ``values[s, g, c]`` is the ``s``-th kept entry (in increasing row order) of group
  ``g`` of column ``c`` - slot-planar, so that a kernel reads each slot as a contiguous
  ``(groups, columns)`` tile;
* ``meta``: ``(n, G/4, N)`` uint8, the position (0..m-1, 2 bits) of every kept entry.
  Groups come in blocks of 32; byte row ``j`` (0..7) of a block holds, in bit pairs
  ``b = 0..3`` (bits ``2b, 2b+1``), the positions of groups ``8b + j`` of that block. A
  kernel unpacks a block with four shifts and one reshape, never an interleave.

Bytes for 2:4 with 16-bit weights: values ``K N`` + meta ``K N / 8`` = 9/16 of the dense
``2 K N``; the metadata is 1/16 of the dense bytes (2 bits per kept value).

Worked example (2:4, ``K = 8``, one column): ``W[:, 0] = [0, 5, 0, 7 | 3, 0, 0, 2]`` has
groups ``g0 = [0, 5, 0, 7]`` (kept rows 1, 3) and ``g1 = [3, 0, 0, 2]`` (kept rows 0, 3).
Then ``values[0, :2, 0] = [5, 3]``, ``values[1, :2, 0] = [7, 2]``; positions slot 0 =
``[1, 0]``, slot 1 = ``[3, 3]``. Groups 0 and 1 sit in byte rows 0 and 1 of block 0, bit
pair 0: ``meta[0, 0, 0] = 1``, ``meta[0, 1, 0] = 0``, ``meta[1, 0, 0] = 3``,
``meta[1, 1, 0] = 3`` (groups 2..31 are padding: value 0, position 0).

Matmul
------
``nm_matmul(x, p)`` computes ``x @ unpack_nm(p)``. The Pallas kernel loads packed tiles,
expands each slot's values into the ``m`` per-position planes ``D_p[g, c] = sum_s
values[s, g, c] * (pos[s, g, c] == p)`` in on-chip memory and feeds ``x_p @ D_p`` to the
matrix unit, where ``x_p = x[:, p::m]`` (the wrapper lays ``x`` out position-major once).
The same kernel body runs on GPU (Triton: one program per output tile, loop over ``K``)
and TPU (Mosaic: ``K`` as the last, sequential grid axis; (8, 128) tiling respected);
``interpret=True`` runs it on CPU. Its ``custom_vjp`` computes ``dx`` with a transposed
kernel that reads the same packed tiles (no dense ``W`` in HBM) and ``d values`` from
``x^T dy`` at the kept positions. ``nm_matmul_reference`` (unpack, then dot) is the
XLA path and the tests' reference.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from sparsejax.kernels.compiler_params import tpu_params, triton_params

__all__ = ["GROUP_BLOCK", "BlockSizes", "PackedNM", "nm_matmul", "nm_matmul_reference",
           "pack_nm", "packed_nbytes", "unpack_nm"]

GROUP_BLOCK = 32  # groups per metadata block (8 byte rows x 4 bit pairs)
_ROWS_PER_BLOCK = GROUP_BLOCK // 4


# --------------------------------------------------------------------------- format


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "meta"],
                   meta_fields=["n", "m", "shape", "axis"])
@dataclass(frozen=True)
class PackedNM:
    """An N:M sparse matrix in packed form (module docstring). A pytree: ``values`` and
    ``meta`` are its leaves (they jit, shard and checkpoint like any array); ``n``, ``m``,
    the dense ``shape`` and the packed ``axis`` are static."""

    values: jax.Array  # (n, G_padded, N)
    meta: jax.Array  # (n, G_padded // 4, N) uint8
    n: int
    m: int
    shape: tuple[int, int]  # dense shape, as given to pack_nm
    axis: int  # axis of the dense matrix the groups run along

    @property
    def groups(self) -> int:
        """Number of real (unpadded) groups along the packed axis."""
        return self.shape[self.axis] // self.m


def _check_pattern(n: int, m: int) -> None:
    if not (1 <= n < m <= 4):
        raise ValueError(f"pack_nm: pattern {n}:{m} unsupported; need 1 <= n < m <= 4 "
                         "(positions are stored in 2 bits)")


def pack_nm(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0, *,
            prune: bool = False) -> PackedNM:
    """Pack a 2-D N:M sparse ``w`` (groups of ``m`` along ``axis``) into :class:`PackedNM`.

    Raises ``ValueError`` when a group holds more than ``n`` non-zeros, unless
    ``prune=True``, which keeps the ``n`` largest magnitudes of every group. Runs under
    ``jit`` only with ``prune=True`` (the check needs concrete values).
    """
    _check_pattern(n, m)
    if w.ndim != 2:
        raise ValueError(f"pack_nm: expected a 2-D matrix, got shape {w.shape}")
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"pack_nm: axis={axis} is not an axis of a 2-D matrix")
    axis = axis % 2
    shape = tuple(w.shape)
    wk = w if axis == 0 else w.T  # (K, N), groups along rows
    k, cols = wk.shape
    if k % m:
        raise ValueError(f"pack_nm: axis {axis} has length {k}, not a multiple of m={m}")
    grouped = wk.reshape(k // m, m, cols)
    if not prune:
        counts = np.asarray(jnp.sum(grouped != 0, axis=1))
        if counts.max(initial=0) > n:
            g, c = np.unravel_index(np.argmax(counts), counts.shape)
            raise ValueError(f"pack_nm: group {g} of column {c} (rows {g * m}..{g * m + m - 1}"
                             f" along axis {axis}) has {counts[g, c]} non-zeros, more than "
                             f"n={n}; pass prune=True to keep the top-{n} magnitudes")
    # the n largest magnitudes (lower position on ties), then in increasing position order
    order = jnp.argsort(-jnp.abs(grouped).astype(jnp.float32), axis=1, stable=True)
    positions = jnp.sort(order[:, :n, :], axis=1)  # (G, n, N)
    values = jnp.take_along_axis(grouped, positions, axis=1)
    groups = k // m
    pad = -groups % GROUP_BLOCK
    values = jnp.pad(jnp.moveaxis(values, 1, 0), ((0, 0), (0, pad), (0, 0)))
    positions = jnp.pad(jnp.moveaxis(positions, 1, 0), ((0, 0), (0, pad), (0, 0)))
    return PackedNM(values, _pack_positions(positions), n, m, shape, axis)


def _pack_positions(pos: jax.Array) -> jax.Array:
    """``(n, G, N)`` ints 0..3 -> ``(n, G/4, N)`` uint8 in the block layout."""
    s, g, c = pos.shape
    blocks = pos.astype(jnp.uint8).reshape(s, g // GROUP_BLOCK, 4, _ROWS_PER_BLOCK, c)
    shifts = jnp.asarray([0, 2, 4, 6], jnp.uint8)[None, None, :, None, None]
    packed = jnp.sum(blocks << shifts, axis=2, dtype=jnp.uint8)  # bit pairs are disjoint
    return packed.reshape(s, g // 4, c)


def _unpack_positions(meta: jax.Array) -> jax.Array:
    """``(..., R, C)`` uint8 metadata rows (R a multiple of 8) -> ``(..., 4R, C)`` int32
    positions in natural group order: four shifts and one reshape (kernel-safe)."""
    *lead, rows, cols = meta.shape
    blocks = meta.astype(jnp.int32).reshape(*lead, rows // _ROWS_PER_BLOCK, 1,
                                            _ROWS_PER_BLOCK, cols)
    shifts = 2 * jax.lax.broadcasted_iota(jnp.int32, (1, 4, 1, 1), 1)
    pos = (blocks >> shifts.reshape((1,) * len(lead) + (1, 4, 1, 1))) & 3
    return pos.reshape(*lead, rows * 4, cols)


def unpack_nm(p: PackedNM) -> jax.Array:
    """The dense matrix of ``p`` (same shape and dtype as given to :func:`pack_nm`)."""
    pos = _unpack_positions(p.meta)[:, :p.groups]  # (n, G, N)
    vals = p.values[:, :p.groups]
    onehot = pos[..., None, :] == jnp.arange(p.m)[:, None]  # (n, G, m, N)
    dense = jnp.sum(jnp.where(onehot, vals[:, :, None, :], 0), axis=0, dtype=vals.dtype)
    dense = dense.reshape(p.groups * p.m, -1)
    return dense if p.axis == 0 else dense.T


def packed_nbytes(p: PackedNM) -> int:
    return int(p.values.size * p.values.dtype.itemsize + p.meta.size)


def nm_matmul_reference(x: jax.Array, p: PackedNM) -> jax.Array:
    """``x @ unpack_nm(p)`` in pure JAX: ``x`` ``(..., K)`` -> ``(..., N)``, float32
    accumulation, ``x``'s dtype out."""
    _check_matmul(x, p)
    w = unpack_nm(p).astype(x.dtype)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _check_matmul(x: jax.Array, p: PackedNM) -> None:
    if p.axis != 0:
        raise ValueError("nm_matmul: the packed axis must be the contracting axis 0 of "
                         f"W (K, N); got axis={p.axis} (pack W, not W.T)")
    if x.shape[-1] != p.shape[0]:
        raise ValueError(f"nm_matmul: x has {x.shape[-1]} features, W has K={p.shape[0]}")


# --------------------------------------------------------------------------- block sizes


@dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: ``block_m`` rows of ``x``, ``block_n`` output columns, ``block_g``
    groups of ``K`` (``m * block_g`` rows of ``W``) per step.

    Constraints (checked by :meth:`validate`): ``block_g`` a multiple of 32 (metadata
    blocks) dividing the padded group count; ``block_n`` dividing ``N``; on TPU,
    ``block_n`` and ``block_g`` multiples of 128 or the whole axis, ``block_m`` of 8.
    """

    block_m: int = 128
    block_n: int = 128
    block_g: int = 128

    @classmethod
    def default(cls, platform: str, m_rows: int, n_cols: int, groups: int) -> BlockSizes:
        """Defaults per platform, shrunk to fit small problems."""
        if platform == "cuda":  # Triton: power-of-two tiles, tl.dot needs >= 16
            bm = min(64, max(16, pl.next_power_of_2(m_rows)))
            bn, bg = 128, 64
        else:  # TPU (and interpret mode): MXU-sized tiles, (8, 128) layout
            bm = min(128, -(-m_rows // 8) * 8)
            bn, bg = 256, 256
        bn = _largest_divisor(n_cols, bn, 128 if n_cols % 128 == 0 else 1)
        bg = _largest_divisor(groups, bg, GROUP_BLOCK)
        return cls(bm, bn, bg)

    def validate(self, platform: str, n_cols: int, groups: int) -> None:
        def fail(msg: str):
            raise ValueError(f"nm_matmul BlockSizes{dataclasses.astuple(self)}: {msg}")

        if min(self.block_m, self.block_n, self.block_g) <= 0:
            fail("block sizes must be positive")
        if self.block_g % GROUP_BLOCK:
            fail(f"block_g={self.block_g} is not a multiple of {GROUP_BLOCK} (metadata blocks)")
        if groups % self.block_g:
            fail(f"block_g={self.block_g} does not divide the {groups} padded groups of K")
        if n_cols % self.block_n:
            fail(f"block_n={self.block_n} does not divide N={n_cols}")
        if platform == "tpu":
            if self.block_m % 8:
                fail(f"block_m={self.block_m} is not a multiple of 8 (TPU sublanes)")
            for name, size, whole in (("block_n", self.block_n, n_cols),
                                      ("block_g", self.block_g, groups)):
                if size % 128 and size != whole:
                    fail(f"{name}={size} is neither a multiple of 128 nor the whole axis "
                         f"({whole}) (TPU lanes)")
        if platform == "cuda":
            for name, size in (("block_m", self.block_m), ("block_n", self.block_n),
                               ("block_g", self.block_g)):
                if size < 16 or size & (size - 1):
                    fail(f"{name}={size} is not a power of two >= 16 (Triton)")


def _largest_divisor(total: int, cap: int, step: int) -> int:
    """Largest multiple of ``step`` that divides ``total`` and is <= ``cap``; else total."""
    for size in range(min(cap, total) // step * step, 0, -step):
        if total % size == 0:
            return size
    return total


# --------------------------------------------------------------------------- kernels


def _planes(v_ref, m_ref, s: int, m: int, dtype, g_slice=slice(None)):
    """Slot ``s`` of a tile: ``m`` position planes ``where(pos == p, values, 0)``,
    each ``(groups, columns)`` in ``dtype``."""
    values = v_ref[s, g_slice, :].astype(jnp.float32)
    pos = _unpack_positions(m_ref[s, _meta_slice(g_slice), :])
    return [jnp.where(pos == p, values, 0.0) for p in range(m)]


def _meta_slice(g_slice):
    if isinstance(g_slice, slice):
        return g_slice
    return pl.ds(g_slice.start // 4, g_slice.size // 4)


def _expanded(v_ref, m_ref, n: int, m: int, dtype, g_slice=slice(None)):
    """The dense tile in position-major form: ``D_p`` for ``p < m``, ``(groups, cols)``."""
    planes = [_planes(v_ref, m_ref, s, m, dtype, g_slice) for s in range(n)]
    return [sum(pl_[p] for pl_ in planes).astype(dtype) for p in range(m)]


def _zero_on_first_reduction_step(o_ref) -> None:
    """Grid kernels accumulate into the resident output block over the last grid axis."""
    @pl.when(pl.program_id(2) == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)


def _fwd_kernel_grid(x_ref, v_ref, m_ref, o_ref, *, n: int, m: int):
    """Mosaic / interpret: grid (M, N, K) with K sequential; o_ref (f32) accumulates."""
    _zero_on_first_reduction_step(o_ref)
    planes = _expanded(v_ref, m_ref, n, m, x_ref.dtype)
    acc = o_ref[...]
    for p in range(m):
        acc += jnp.dot(x_ref[p], planes[p], preferred_element_type=jnp.float32)
    o_ref[...] = acc


def _fwd_kernel_loop(x_ref, v_ref, m_ref, o_ref, *, n: int, m: int, block_g: int):
    """Triton: grid (M, N); each program loops over K in steps of ``block_g`` groups."""
    steps = x_ref.shape[-1] // block_g

    def body(k, acc):
        g = pl.ds(pl.multiple_of(k * block_g, block_g), block_g)
        planes = _expanded(v_ref, m_ref, n, m, x_ref.dtype, g)
        for p in range(m):
            acc += jnp.dot(x_ref[p, :, g], planes[p], preferred_element_type=jnp.float32)
        return acc

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def _dx_kernel_grid(dy_ref, v_ref, m_ref, o_ref, *, n: int, m: int):
    """Transposed product ``dx_p = dy @ D_p^T``; grid (M, G, N) with N sequential."""
    _zero_on_first_reduction_step(o_ref)
    planes = _expanded(v_ref, m_ref, n, m, dy_ref.dtype)
    dy = dy_ref[...]
    for p in range(m):
        o_ref[p] += _dot_t(dy, planes[p])


def _dx_kernel_loop(dy_ref, v_ref, m_ref, o_ref, *, n: int, m: int, block_n: int):
    """Triton: grid (M, G); each program loops over N in steps of ``block_n``."""
    steps = dy_ref.shape[-1] // block_n

    def body(j, accs):
        cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        planes = [_planes_cols(v_ref, m_ref, s, m, cols) for s in range(n)]
        dy = dy_ref[:, cols]
        return tuple(acc + _dot_t(dy, sum(pl_[p] for pl_ in planes).astype(dy.dtype))
                     for p, acc in enumerate(accs))

    zeros = jnp.zeros(o_ref.shape[1:], jnp.float32)
    accs = jax.lax.fori_loop(0, steps, body, (zeros,) * m)
    for p in range(m):
        o_ref[p] = accs[p]


def _planes_cols(v_ref, m_ref, s, m, cols):
    values = v_ref[s, :, cols].astype(jnp.float32)
    pos = _unpack_positions(m_ref[s, :, cols])
    return [jnp.where(pos == p, values, 0.0) for p in range(m)]


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _forward_call(xp: jax.Array, values, meta, n, m, bs: BlockSizes, platform: str,
                  interpret: bool) -> jax.Array:
    """``xp``: position-major ``(m, M, G)`` -> ``(M, N)`` float32."""
    _, rows, groups = xp.shape
    cols = values.shape[-1]
    out = jax.ShapeDtypeStruct((rows, cols), jnp.float32)
    if platform == "cuda":
        return pl.pallas_call(
            functools.partial(_fwd_kernel_loop, n=n, m=m, block_g=bs.block_g),
            grid=(rows // bs.block_m, cols // bs.block_n),
            in_specs=[pl.BlockSpec((m, bs.block_m, groups), lambda i, j: (0, i, 0)),
                      pl.BlockSpec((n, groups, bs.block_n), lambda i, j: (0, 0, j)),
                      pl.BlockSpec((n, groups // 4, bs.block_n), lambda i, j: (0, 0, j))],
            out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j: (i, j)),
            out_shape=out, compiler_params=triton_params(num_stages=2), interpret=interpret,
        )(xp, values, meta)
    return pl.pallas_call(
        functools.partial(_fwd_kernel_grid, n=n, m=m),
        grid=(rows // bs.block_m, cols // bs.block_n, groups // bs.block_g),
        in_specs=[pl.BlockSpec((m, bs.block_m, bs.block_g), lambda i, j, k: (0, i, k)),
                  pl.BlockSpec((n, bs.block_g, bs.block_n), lambda i, j, k: (0, k, j)),
                  pl.BlockSpec((n, bs.block_g // 4, bs.block_n), lambda i, j, k: (0, k, j))],
        out_specs=pl.BlockSpec((bs.block_m, bs.block_n), lambda i, j, k: (i, j)),
        out_shape=out, interpret=interpret,
        compiler_params=None if interpret else tpu_params("parallel", "parallel",
                                                           "arbitrary"),
    )(xp, values, meta)


def _dx_call(dy: jax.Array, values, meta, n, m, bs: BlockSizes, platform: str,
             interpret: bool) -> jax.Array:
    """``dy``: ``(M, N)`` -> position-major ``dx`` ``(m, M, G)`` float32."""
    rows, cols = dy.shape
    groups = values.shape[1]
    out = jax.ShapeDtypeStruct((m, rows, groups), jnp.float32)
    if platform == "cuda":
        return pl.pallas_call(
            functools.partial(_dx_kernel_loop, n=n, m=m, block_n=bs.block_n),
            grid=(rows // bs.block_m, groups // bs.block_g),
            in_specs=[pl.BlockSpec((bs.block_m, cols), lambda i, k: (i, 0)),
                      pl.BlockSpec((n, bs.block_g, cols), lambda i, k: (0, k, 0)),
                      pl.BlockSpec((n, bs.block_g // 4, cols), lambda i, k: (0, k, 0))],
            out_specs=pl.BlockSpec((m, bs.block_m, bs.block_g), lambda i, k: (0, i, k)),
            out_shape=out, compiler_params=triton_params(num_stages=2), interpret=interpret,
        )(dy, values, meta)
    return pl.pallas_call(
        functools.partial(_dx_kernel_grid, n=n, m=m),
        grid=(rows // bs.block_m, groups // bs.block_g, cols // bs.block_n),
        in_specs=[pl.BlockSpec((bs.block_m, bs.block_n), lambda i, k, j: (i, j)),
                  pl.BlockSpec((n, bs.block_g, bs.block_n), lambda i, k, j: (0, k, j)),
                  pl.BlockSpec((n, bs.block_g // 4, bs.block_n), lambda i, k, j: (0, k, j))],
        out_specs=pl.BlockSpec((m, bs.block_m, bs.block_g), lambda i, k, j: (0, i, k)),
        out_shape=out, interpret=interpret,
        compiler_params=None if interpret else tpu_params("parallel", "parallel",
                                                           "arbitrary"),
    )(dy, values, meta)


# --------------------------------------------------------------------------- wrapper


def _position_major(x2: jax.Array, m: int, groups_padded: int) -> jax.Array:
    """``(M, K)`` -> ``(m, M, G_padded)``: ``out[p, :, g] = x[:, m g + p]`` (zero pad)."""
    rows, k = x2.shape
    x3 = jnp.moveaxis(x2.reshape(rows, k // m, m), 2, 0)
    return jnp.pad(x3, ((0, 0), (0, 0), (0, groups_padded - k // m)))


def _natural(dxp: jax.Array, k: int) -> jax.Array:
    """Inverse of :func:`_position_major`: ``(m, M, G_padded)`` -> ``(M, K)``."""
    m, rows, _ = dxp.shape
    return jnp.moveaxis(dxp[:, :, :k // m], 0, 2).reshape(rows, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _packed_matmul(x2, values, meta, static, bs):
    n, m, shape, platform, interpret = static
    rows = x2.shape[0]
    pad_rows = -rows % bs.block_m
    xp = _position_major(jnp.pad(x2, ((0, pad_rows), (0, 0))), m, values.shape[1])
    y = _forward_call(xp, values, meta, n, m, bs, platform, interpret)
    return y[:rows].astype(x2.dtype)


def _packed_matmul_fwd(x2, values, meta, static, bs):
    return _packed_matmul(x2, values, meta, static, bs), (x2, values, meta)


def _packed_matmul_bwd(static, bs, res, dy):
    n, m, shape, platform, interpret = static
    x2, values, meta = res
    rows = dy.shape[0]
    dy_pad = jnp.pad(dy, ((0, -rows % bs.block_m), (0, 0)))
    dxp = _dx_call(dy_pad, values, meta, n, m, bs, platform, interpret)
    dx = _natural(dxp[:, :rows], shape[0]).astype(x2.dtype)
    # d values: x^T dy at the kept positions (a dense GEMM of the weight's size, as any
    # weight gradient; only the kept entries are read out).
    dw = jnp.matmul(x2.T, dy, preferred_element_type=jnp.float32)
    groups = shape[0] // m
    pos = _unpack_positions(meta)[:, :groups]
    dw_groups = dw.reshape(groups, m, -1)
    dvals = jnp.stack([jnp.take_along_axis(dw_groups, pos[s][:, None, :], axis=1)[:, 0]
                       for s in range(n)])
    dvals = jnp.pad(dvals, ((0, 0), (0, values.shape[1] - groups), (0, 0)))
    meta_ct = np.zeros(meta.shape, dtype=jax.dtypes.float0)
    return dx, dvals.astype(values.dtype), meta_ct


_packed_matmul.defvjp(_packed_matmul_fwd, _packed_matmul_bwd)


def _accelerator() -> str | None:
    backend = jax.default_backend()
    return {"gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}.get(backend)


def nm_matmul(x: jax.Array, p: PackedNM, *, block_sizes: BlockSizes | None = None,
              backend: str = "auto", interpret: bool | None = None,
              platform: str | None = None) -> jax.Array:
    """``x @ W`` for a packed N:M ``W``: ``x`` ``(..., K)`` -> ``(..., N)`` in ``x``'s dtype
    (float32 accumulation). Differentiable in ``x`` and ``p.values``.

    ``backend``: ``"pallas"`` (the kernel), ``"xla"`` (:func:`nm_matmul_reference`) or
    ``"auto"`` (Pallas on GPU/TPU, XLA on CPU). ``interpret=None`` interprets the kernel
    when no accelerator is present. ``platform`` (``"cuda"`` | ``"tpu"``) picks the kernel
    variant and its block-size rules; default: the accelerator present (TPU rules when
    interpreting) - set it when exporting for another platform.
    """
    _check_matmul(x, p)
    if backend not in ("auto", "pallas", "xla"):
        raise ValueError(f"nm_matmul: backend='{backend}' is not one of auto|pallas|xla")
    accel = _accelerator()
    if backend == "xla" or (backend == "auto" and accel is None):
        return nm_matmul_reference(x, p)
    platform = platform or accel or "tpu"
    if platform not in ("cuda", "tpu"):
        raise ValueError(f"nm_matmul: platform='{platform}' is not one of cuda|tpu")
    interpret = (accel is None) if interpret is None else interpret
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    groups, cols = p.values.shape[1], p.values.shape[2]
    bs = block_sizes or BlockSizes.default(platform, x2.shape[0], cols, groups)
    bs.validate(platform, cols, groups)
    y = _packed_matmul(x2, p.values, p.meta, (p.n, p.m, p.shape, platform, interpret), bs)
    return y.reshape(*lead, cols)
