"""Double Sparse Factorization (Boza & Macko, ICLR 2025; docs/methods.md §9.4): the
weight ``W`` ``(in, out)`` becomes the product of two sparse factors, ``W ~ A B`` with
``nnz(A) + nnz(B)`` equal to the budget ``round((1 - sparsity) * in * out)``.

The schedule follows the authors' code (``usamec/double_sparse``), written here for
sparsejax's ``(in, out)`` kernels. In the reference's layout ``Wt = W^T`` ``(out, in)``:

- scale the inputs by ``s = sqrt(diag H) + 1e-8``: ``Wn = Wt * s`` (columns); in that
  space the weighted error is approximated by the plain Frobenius one;
- the square factor ``S`` (``r x r``, ``r = min(in, out)``) starts as the identity, the
  other factor ``R`` as the magnitude mask of ``Wn`` keeping half its budget; ``S`` gets
  ``int(r^2 * a)`` non-zeros (``a = 0.16`` for square ``W``, else ``0.25``), ``R`` the rest;
- 40 outer rounds, each solving for ``S`` with ``R`` fixed, then ``R`` with ``S`` fixed,
  by :func:`sparse_least_squares` (ADMM for ``min ||F X - Y||`` with ``nnz(X)`` fixed:
  columns of ``F`` normalised, ridge ``1e-2``, penalty 1, the mask re-chosen by magnitude
  of ``X + U`` in its first 2 of 5 iterations; the first solve's penalty ramps as
  ``min(1, t / 37)^3`` over the rounds ``t``, warm-starting from the last round);
- finally the factor on the output side is refitted with its mask fixed against the full
  weighted error ``tr[(W - A B)^T H (W - A B)]`` (20 ADMM iterations).

Addition: the two factors are then rescaled to equal norms per inner index
(:func:`balance_factors`; product and masks unchanged), so that masked fine-tuning with
Adam does not blow up the factor the scaling left small.

Deviation: the reference keeps entries above a sorted threshold (its counts can miss the
budget by ties or by one); here each mask is an exact top-``k``, so the factor masks hold
exactly the budget. The weighted error is recorded after every round (``info["error"]``);
it is not guaranteed to fall at every round, because the rounds minimise the diagonally
scaled error while ``H`` has off-diagonal mass, and because the masks change in every
solve (docs/methods.md §9.4 reports where it rises).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from sparsejax.transforms.base import (
    Context,
    Metrics,
    Site,
    SpecError,
    State,
    View,
    register,
)
from sparsejax.transforms.prune.common import (
    PostTrainingPruning,
    PruneError,
    PruneResult,
    compute_dtype,
    weighted_error,
)
from sparsejax.transforms.sparsity.unstructured import top_k_mask

__all__ = ["DSF", "balance_factors", "dsf_factorize", "refit_fixed_mask",
           "sparse_least_squares"]

RIDGE = 1e-2  # the ridge of every least-squares solve, relative to the mean diagonal
INNER_ITERS, MASK_ITERS = 5, 2  # ADMM iterations per solve; of them, the mask-choosing ones
REFIT_ITERS = 20


def sparse_least_squares(f: jax.Array, y: jax.Array, nnz: int, z: jax.Array, u: jax.Array,
                         rho_start: jax.Array, mask: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ADMM for ``min_X ||F X - Y||_F^2`` with ``nnz`` non-zeros in ``X`` (or the fixed
    ``mask``). ``F`` ``(p, r)``, ``Y`` ``(p, c)``, ``X`` ``(r, c)``; ``z``, ``u``: the
    previous sparse iterate and scaled dual (warm start). Returns ``(Z, U, mask)`` with
    ``Z`` exactly zero outside ``mask``, which holds ``nnz`` entries."""
    norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=0)) + 1e-8  # (r,)
    fn = f / norm
    gram = fn.T @ fn
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    gram = gram + eye * jnp.mean(jnp.diag(gram)) * RIDGE
    rhs = fn.T @ y
    solve_1 = jnp.linalg.inv(gram + eye)
    solve_start = jnp.linalg.inv(gram + eye * rho_start)
    z, u = z * norm[:, None], u * norm[:, None]
    x = solve_start @ (rhs + rho_start * (z - u))
    chosen = mask
    for it in range(INNER_ITERS):
        if mask is None and it < MASK_ITERS:
            chosen = top_k_mask(jnp.abs(x + u), nnz)
        z = jnp.where(chosen, x + u, 0.0)
        u = u + x - z
        x = solve_1 @ (rhs + (z - u))
    return z / norm[:, None], u / norm[:, None], chosen


@partial(jax.jit, static_argnames=("nnz_square", "nnz_other"))
def _round(wn, sq, sq_u, other, other_u, rho, nnz_square: int, nnz_other: int):
    """One outer round in the scaled space: ``Wn ~ S @ O`` with ``S`` square ``(r, r)``
    and ``O`` ``(r, c)``; ``S`` is solved first (through the transposes), then ``O``."""
    sq_t, sq_u_t, sq_mask_t = sparse_least_squares(other.T, wn.T, nnz_square, sq.T, sq_u.T,
                                                   rho)
    sq, sq_u = sq_t.T, sq_u_t.T
    other, other_u, other_mask = sparse_least_squares(sq, wn, nnz_other, other, other_u, rho)
    return sq, sq_u, sq_mask_t.T, other, other_u, other_mask


@jax.jit
def refit_fixed_mask(left: jax.Array, right: jax.Array, mask: jax.Array, w_t: jax.Array,
                     h: jax.Array) -> jax.Array:
    """The reference's final step, in its layout: ``W^T ~ L R`` with ``L`` ``(out, k)``
    refitted on its ``mask`` (``R`` ``(k, in)`` fixed) to minimise the full weighted error
    ``tr[(W^T - L R) H (W^T - L R)^T]``; 20 ADMM iterations from the current ``L``."""
    gram = right @ h @ right.T  # (k, k)
    cross = right @ h @ w_t.T  # (k, out)
    norm = jnp.sqrt(jnp.diag(gram)) + 1e-8
    gram = gram / norm / norm[:, None]
    cross = cross / norm[:, None]
    x = (left * norm).T  # (k, out)
    solve = jnp.linalg.inv(gram + jnp.eye(gram.shape[0], dtype=gram.dtype))
    u = jnp.zeros_like(x)
    mask_t = mask.T
    z = x
    for _ in range(REFIT_ITERS):
        z = jnp.where(mask_t, x + u, 0.0)
        u = u + x - z
        x = solve @ (cross + (z - u))
    return z.T / norm


def square_share(shape: tuple[int, int]) -> float:
    """The share of the square factor's ``r^2`` entries it may keep (the reference's
    ``asp``): 0.16 for a square weight, 0.25 otherwise."""
    return 0.16 if shape[0] == shape[1] else 0.25


def dsf_factorize(w: jax.Array, h: jax.Array, sparsity: float, rounds: int = 40,
                  refit: bool = True) -> PruneResult:
    """DSF of ``w`` ``(in, out)`` with calibration Gram ``h`` ``(in, in)`` at
    ``sparsity`` (fraction of ``in * out`` not stored by the two factors together).
    Returns ``weight = A @ B``, ``factors = (A, B)``, their masks and
    ``info["error"]``: the weighted error after each round (then after the refit)."""
    dtype = compute_dtype(w, h)  # float32, or float64 for float64 inputs
    w, h = jnp.asarray(w, dtype), jnp.asarray(h, dtype)
    n_in, n_out = w.shape
    budget = round((1.0 - sparsity) * n_in * n_out)
    r = min(n_in, n_out)
    nnz_square = int(r * r * square_share(w.shape))
    nnz_other = budget - nnz_square
    if nnz_other < 1:
        raise PruneError(f"a budget of {budget} non-zeros (sparsity {sparsity}) does not "
                         f"cover the square factor's {nnz_square}; lower the sparsity")
    scale = jnp.sqrt(jnp.maximum(jnp.diag(h), 0.0)) + 1e-8  # (in,)
    # the scaled problem Wn ~ S @ O, S square: in the reference's layout (out < in) the
    # square factor is on the output side, Wn = W^T * scale; else on the input side,
    # Wn = W * scale[:, None] (its factorizeT)
    square_out = n_out < n_in
    wn = (w.T * scale[None, :]) if square_out else (w * scale[:, None])
    sq, sq_u = jnp.eye(r, dtype=dtype), jnp.zeros((r, r), dtype)
    other = jnp.where(top_k_mask(jnp.abs(wn), nnz_other // 2), wn, 0.0)
    other_u = jnp.zeros_like(other)
    sq_mask = other_mask = None

    def product(sq, other):  # (A, B) in (in, out) convention, and A @ B
        if square_out:  # W^T ~ S (O / scale): A = (O / scale)^T, B = S^T
            a, b = (other / scale[None, :]).T, sq.T
        else:  # W ~ (S / scale) O
            a, b = sq / scale[:, None], other
        return a, b

    errors = []
    for t in range(rounds):
        rho = jnp.asarray(min(1.0, t / max(rounds - 3, 1)) ** 3, dtype)
        sq, sq_u, sq_mask, other, other_u, other_mask = _round(
            wn, sq, sq_u, other, other_u, rho, nnz_square, nnz_other)
        a, b = product(sq, other)
        errors.append(float(weighted_error(w, a @ b, h)))
    a, b = product(sq, other)
    a_mask, b_mask = (other_mask.T, sq_mask.T) if square_out else (sq_mask, other_mask)
    if refit:  # refit B (the output side) against the full weighted error
        b = refit_fixed_mask(b.T, a.T, b_mask.T, w.T, h).T
        errors.append(float(weighted_error(w, a @ b, h)))
    a, b = balance_factors(jnp.where(a_mask, a, 0.0), jnp.where(b_mask, b, 0.0))
    return PruneResult(a @ b, None, (a, b), (a_mask, b_mask),
                       {"error": errors, "refit": refit})


def balance_factors(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A D, D^-1 B)`` with ``D = diag(sqrt(||B_k,:|| / ||A_:,k||))``: column ``k`` of
    ``A`` and row ``k`` of ``B`` get equal norms; the product and the zeros are unchanged.
    Without it the input-side factor holds ``1 / sqrt(H_jj)``-sized entries and the other
    ``sqrt(H_jj)``-sized ones (the scaling of the factorisation), and Adam, whose steps
    have the same size for every entry, wrecks the small factor when fine-tuning."""
    col = jnp.sqrt(jnp.sum(jnp.square(a), axis=0))
    row = jnp.sqrt(jnp.sum(jnp.square(b), axis=1))
    d = jnp.where((col > 0) & (row > 0), jnp.sqrt(row / jnp.where(col > 0, col, 1.0)), 1.0)
    return a * d[None, :], b / d[:, None]


@register("prune", "dsf")
@dataclass(frozen=True, kw_only=True)
class DSF(PostTrainingPruning):
    """``rounds``: outer alternating rounds (40 in the reference); ``refit``: the final
    fixed-mask refit of the output-side factor against the full weighted error.

    In the model, the factor shaped like the kernel ``(in, out)`` *is* the layer's kernel
    (masked, ``state["mask"]``) and the square factor ``(r, r)`` is the transform's
    trainable ``params["factor"]`` (masked, ``state["factor_mask"]``); the layer's weight
    is their product (``S @ K`` when ``in <= out``, else ``K @ S``), a dense matmul -
    simulation, as for every method here. Fine-tuning trains both factors on their masks.
    """

    rounds: int = 40
    refit: bool = True

    def check(self) -> None:
        super().check()
        if self.n:
            raise SpecError("n", "dsf factorises into two unstructured sparse factors; "
                            "give sparsity, not an N:M pattern")
        if self.rounds < 1:
            raise SpecError("rounds", f"rounds must be >= 1, got {self.rounds}")

    @staticmethod
    def square_first(site: Site) -> bool:
        """Whether the square factor is on the input side (``in <= out``)."""
        return site.shape[0] <= site.shape[1]

    @property
    def produces_zeros(self) -> bool:
        return False  # the product of two sparse factors is dense

    def prune(self, w: jax.Array, h: jax.Array) -> PruneResult:
        return dsf_factorize(w, h, self.sparsity, self.rounds, self.refit)

    # ------------------------------------------------------------------ the transform
    def params(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {"factor": jnp.eye(min(site.shape), dtype=jnp.float32)}

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        # before calibration: the identity factorisation of the weight as it is
        return {"mask": x != 0, "factor_mask": jnp.eye(min(site.shape), dtype=bool),
                "pruned": jnp.zeros((), bool)}

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        kernel = jnp.where(state["mask"], x, jnp.zeros_like(x))
        square = jnp.where(state["factor_mask"], params["factor"], 0.0).astype(x.dtype)
        return (square @ kernel if self.square_first(site) else kernel @ square), state, {}

    def calibrate(self, site: Site, view: View, h: jax.Array) -> View:
        result = self.prune(view.x, h)
        (a, b), (a_mask, b_mask) = result.factors, result.factor_masks
        if self.square_first(site):
            square, square_mask, kernel, kernel_mask = a, a_mask, b, b_mask
        else:
            square, square_mask, kernel, kernel_mask = b, b_mask, a, a_mask
        return View(kernel.astype(view.x.dtype), {**view.params, "factor": square},
                    {**view.state, "mask": kernel_mask, "factor_mask": square_mask,
                     "pruned": jnp.ones((), bool)})

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        kept = (jnp.sum(after.state["mask"]) + jnp.sum(after.state["factor_mask"]))
        return {"sparsity": 1.0 - kept / site.size}
