"""The sparse linear op ``y = x @ W_eff`` with S-STE's three-GEMM layout (docs/methods.md §1).

| GEMM                      | sparse operand                                   |
|---------------------------|--------------------------------------------------|
| forward   Z  = X W_eff    | W_eff (N:M along ``in``, produced by the caller) |
| weight    dW = X^T dZ     | dZ, made 2:4 along the token axis by MVUE        |
| input     dX = dZ W_eff^T | none (dense)                                     |

Optional FP8 *simulation* (reference code): E4M3 forward operands, E5M2 for dZ in the
backward GEMMs, per-tensor amax scaling, float32 accumulation.

``kernel="pallas"``: the forward GEMM and the input-gradient GEMM run on the packed weight
(``sparsejax.kernels.nm_matmul``; W_eff is packed every step), the weight gradient stays a
dense GEMM (the straight-through estimators need it for every entry).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsejax.kernels.nm_matmul import nm_matmul, pack_nm
from sparsejax.quant import fp8
from sparsejax.sparsity import mvue24

__all__ = ["nm_linear"]


def nm_linear(x: jax.Array, w_eff: jax.Array, key: jax.Array | None = None, *,
              mvue: bool = False, fp8_sim: bool = False,
              packed: tuple[int, int] | None = None) -> jax.Array:
    """``x``: ``(..., in)``, ``w_eff``: ``(in, out)`` -> ``(..., out)`` in ``x``'s dtype.

    ``mvue=True`` needs ``key`` (fresh per step): the weight gradient is then computed from
    an unbiased 2:4 sparsification of dZ along the flattened token axis (token count
    padded with zero rows to a multiple of 4). ``packed=(n, m)``: ``w_eff`` is n:m along
    ``in``; the forward and dX GEMMs use the packed Pallas kernel.
    """
    if mvue and key is None:
        raise ValueError("nm_linear(mvue=True) needs a PRNG key")
    if key is None:
        key = jax.random.key(0)  # unused
    lead = x.shape[:-1]
    y = _nm_linear_2d(x.reshape(-1, x.shape[-1]), w_eff, key, mvue, fp8_sim, packed)
    return y.reshape(*lead, w_eff.shape[-1])


def _operands(x, w, fp8_sim):
    return (fp8(x, "e4m3"), fp8(w, "e4m3")) if fp8_sim else (x, w)


def _matmul(a, b, out_dtype):
    return jnp.matmul(a, b.astype(a.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _pack(w, x_dtype, packed):
    return pack_nm(w.astype(x_dtype), *packed, prune=True)  # exact n:m: prune keeps all


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _nm_linear_2d(x, w, key, mvue, fp8_sim, packed):
    return _fwd(x, w, key, mvue, fp8_sim, packed)[0]


def _fwd(x, w, key, mvue, fp8_sim, packed):
    xq, wq = _operands(x, w, fp8_sim)
    if packed is not None:
        packed_w = _pack(wq, xq.dtype, packed)
        y = nm_matmul(xq, packed_w, backend="pallas")
    else:
        packed_w, y = None, _matmul(xq, wq, x.dtype)
    return y, (xq, wq, key, packed_w)  # the packed weight is reused by the dX GEMM


def _bwd(mvue, fp8_sim, packed, res, dz):
    xq, wq, key, packed_w = res
    if fp8_sim:
        dz = fp8(dz, "e5m2")
    if packed is not None:  # the transposed kernel reads the packed weight
        dx = jax.vjp(lambda x: nm_matmul(x, packed_w, backend="pallas"), xq)[1](
            dz.astype(xq.dtype))[0]
    else:
        dx = _matmul(dz, wq.T, xq.dtype)
    dz_w = dz
    if mvue:
        tokens = dz.shape[0]
        pad = (-tokens) % 4
        dz_pad = jnp.pad(dz, ((0, pad), (0, 0))) if pad else dz
        dz_w = mvue24(dz_pad, key, axis=0)[:tokens]
    dw = _matmul(xq.T, dz_w, wq.dtype)
    key_ct = jax.tree.map(lambda k: None, key)  # PRNG keys have no cotangent
    return dx, dw, key_ct


_nm_linear_2d.defvjp(_fwd, _bwd)
