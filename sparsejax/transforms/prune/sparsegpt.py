"""SparseGPT (Frantar & Alistarh 2023; docs/methods.md §9.3): one-shot pruning with
optimal-brain-surgeon updates of the weights that stay.

With ``H = X^T X + lambda I`` (``lambda`` = 1 % of the mean diagonal) and ``U`` the upper
Cholesky factor of ``H^-1`` (``U^T U = H^-1``), the input features are visited in order,
in blocks of ``blocksize``. At the start of a block (unstructured) or of every group of
``m`` features (N:M), the mask is chosen from the current weights by the OBS saliency
``w^2 / U_jj^2``: the lowest ``round(sparsity * out * i2) - round(sparsity * out * i1)``
of the block's entries (so the layer loses exactly ``round(sparsity * in * out)``), or
the ``m - n`` lowest of each group for every output. Visiting feature ``j``, the pruned
weights' error ``e = (w_j - q_j) / U_jj`` (``q_j``: ``w_j`` with its pruned entries zero)
is pushed onto the features not visited yet: ``W_{k} -= e U_jk`` for ``k > j`` - the OBS
update restricted to them, since the row ``j`` of ``U`` holds ``[H_F^-1]_{:,j} /
sqrt([H_F^-1]_jj)`` for ``F`` = the features from ``j`` on.

Weights here are ``(in, out)``; the algorithm runs on the transpose ``(out, in)`` so
that it reads like the reference (``IST-DASLab/sparsegpt``), whose column order it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from sparsejax.sparsity import nm_mask
from sparsejax.transforms.base import SpecError, register
from sparsejax.transforms.prune.common import (
    DAMPENING,
    PostTrainingPruning,
    PruneError,
    PruneResult,
    dampened,
)
from sparsejax.transforms.sparsity.unstructured import top_k_mask

__all__ = ["SparseGPT", "inverse_cholesky_upper", "sparsegpt_prune"]


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
    """``U`` upper triangular with ``U^T U = H^-1`` ``(in, in)``; raises
    :class:`PruneError` when ``H`` is not positive definite."""
    lower = jnp.linalg.cholesky(h)
    if not bool(jnp.all(jnp.isfinite(lower))):
        raise PruneError("the calibration Gram matrix is singular after dampening "
                         "(Cholesky failed)")
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    l_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    h_inv = l_inv.T @ l_inv
    upper = jnp.linalg.cholesky(h_inv).T
    if not bool(jnp.all(jnp.isfinite(upper))):
        raise PruneError("the inverse of the dampened calibration Gram matrix is not "
                         "positive definite at this precision (ill-conditioned inputs)")
    return upper


@partial(jax.jit, static_argnames=("n", "m"))
def _prune_block(w1: jax.Array, u1: jax.Array, prune: jax.Array, n: int, m: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block: ``w1`` ``(out, B)``, ``u1`` ``(B, B)`` its block of ``U``, ``prune``
    the entries to remove (unstructured; ``n = 0``). Returns ``(q1, err1, pruned)``: the
    pruned-and-updated weights, the scaled errors for the later blocks, the mask."""
    out, size = w1.shape
    d = jnp.diag(u1)
    group = m if n else 1
    pruned = (jnp.zeros(w1.shape, bool) if n else
              top_k_mask(-jnp.square(w1) / jnp.square(d)[None, :], prune))  # the lowest

    def visit(g, carry):
        w1, q1, err1, pruned = carry
        start = g * group
        if n:  # choose this group's mask from the weights as updated so far
            cols = jax.lax.dynamic_slice(w1, (0, start), (out, m))
            dg = jax.lax.dynamic_slice(d, (start,), (m,))
            keep = nm_mask((jnp.square(cols) / jnp.square(dg)).T, n, m, axis=0).T
            pruned = jax.lax.dynamic_update_slice(pruned, ~keep, (0, start))
        for k in range(group):
            i = start + k
            col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            q = jnp.where(jax.lax.dynamic_index_in_dim(pruned, i, 1, keepdims=False), 0.0, col)
            e = (col - q) / d[i]
            w1 = w1 - e[:, None] * jax.lax.dynamic_index_in_dim(u1, i, 0, keepdims=False)[None]
            q1 = jax.lax.dynamic_update_index_in_dim(q1, q, i, axis=1)
            err1 = jax.lax.dynamic_update_index_in_dim(err1, e, i, axis=1)
        return w1, q1, err1, pruned

    zeros = jnp.zeros_like(w1)
    _, q1, err1, pruned = jax.lax.fori_loop(0, size // group, visit,
                                            (w1, zeros, zeros, pruned))
    return q1, err1, pruned


def sparsegpt_prune(w: jax.Array, h: jax.Array, *, sparsity: float = 0.5, n: int = 0,
                    m: int = 0, blocksize: int = 128, dampening: float = DAMPENING
                    ) -> PruneResult:
    """SparseGPT on ``w`` ``(in, out)`` with calibration Gram ``h`` ``(in, in)``:
    unstructured at ``sparsity`` (``n = 0``) or ``n:m`` along the inputs. Returns the
    pruned, updated weight and its mask."""
    h, w = dampened(h, w, dampening)  # float32, or float64 for float64 inputs
    upper = inverse_cholesky_upper(h)
    w_t = w.T  # (out, in): the reference's layout, features as columns
    out, cols = w_t.shape
    if n:
        blocksize = max(m, blocksize - blocksize % m)
    q_blocks, masks = [], []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        prune = round(sparsity * out * i2) - round(sparsity * out * i1)
        q1, err1, pruned = _prune_block(w_t[:, i1:i2], upper[i1:i2, i1:i2],
                                        jnp.asarray(prune), n, m)
        w_t = w_t.at[:, i2:].add(-err1 @ upper[i1:i2, i2:])
        q_blocks.append(q1)
        masks.append(~pruned)
    return PruneResult(jnp.concatenate(q_blocks, 1).T, jnp.concatenate(masks, 1).T)


@register("prune", "sparsegpt")
@dataclass(frozen=True, kw_only=True)
class SparseGPT(PostTrainingPruning):
    """``blocksize``: features per lazy-update block (128 in the paper); ``dampening``:
    ``lambda`` as a fraction of the mean diagonal of ``H``."""

    blocksize: int = 128
    dampening: float = DAMPENING

    def check(self) -> None:
        super().check()
        if self.blocksize < 1:
            raise SpecError("blocksize", f"blocksize must be >= 1, got {self.blocksize}")
        if self.dampening < 0:
            raise SpecError("dampening", f"dampening must be >= 0, got {self.dampening}")

    def prune(self, w: jax.Array, h: jax.Array) -> PruneResult:
        return sparsegpt_prune(w, h, sparsity=self.sparsity, n=self.n, m=self.m,
                               blocksize=self.blocksize, dampening=self.dampening)
