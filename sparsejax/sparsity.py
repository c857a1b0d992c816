"""N:M sparsity transforms: masks, S-STE's continuous pruning, STE / SR-STE, and MVUE.

Pure functions of arrays (jit / vmap / grad safe, any float dtype); the methods that use
them, one spec class each, are in ``sparsejax.transforms.sparsity``. ``axis`` is the
contracting (input) axis of the matmul that consumes the tensor - axis 0 of a Flax
``(in, out)`` kernel - and a *group* is ``m`` consecutive entries along it.
Formulas: ``docs/methods.md`` sections 1-2 (S-STE, Hu, Zhu, Chen, NeurIPS 2024;
SR-STE, Zhou et al., ICLR 2021; MVUE, Chmiel et al., ICLR 2023; MaskLLM, Fang et al.,
NeurIPS 2024).

All of this is *simulated* sparsity: the effective weight is a dense array with zeros, so
it saves no FLOPs or memory by itself; the packed 2:4 kernel (``sparsejax.kernels``) is
where savings come from.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.dtypes import upcast
from sparsejax.estimators import straight_through

__all__ = [
    "MASK_PRIORS",
    "argmax_nm_mask",
    "candidate_masks",
    "check_nm",
    "flip_rate",
    "gumbel_nm_mask",
    "init_mask_logits",
    "linear_schedule",
    "mask_entropy",
    "mask_logits_shape",
    "mvue24",
    "nm_mask",
    "soft_threshold",
    "sr_ste",
    "sste",
    "sste_scale",
    "ste",
    "threshold_nm",
]

MASK_PRIORS = ("magnitude", "none")


def check_nm(shape: tuple[int, ...], n: int, m: int, axis: int) -> int:
    """Validate an N:M pattern against ``shape``; returns the normalised axis."""
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern {n}:{m} needs 1 <= n < m (shape {tuple(shape)})")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for shape {tuple(shape)}")
    axis %= len(shape)
    if shape[axis] % m:
        raise ValueError(f"shape {tuple(shape)}: axis {axis} of size {shape[axis]} is not "
                         f"divisible by m={m} for the {n}:{m} pattern")
    return axis


def _grouped(x: jax.Array, m: int, axis: int) -> jax.Array:
    """``x`` with ``axis`` moved last and split into groups: ``(..., K // m, m)``."""
    moved = jnp.moveaxis(x, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def _ungrouped(g: jax.Array, axis: int) -> jax.Array:
    return jnp.moveaxis(g.reshape(*g.shape[:-2], -1), -1, axis)


def _group_mask(mag: jax.Array, n: int) -> jax.Array:
    """Top-``n`` of each last-axis group of magnitudes ``(..., m)``; ties go to the lower
    index. The rank of entry i counts entries j that beat it: larger magnitude, or equal
    magnitude at a lower index."""
    m = mag.shape[-1]
    a, b = mag[..., :, None], mag[..., None, :]  # (..., i, j)
    lower = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # j < i
    beats = (b > a) | ((b == a) & lower)
    return beats.sum(-1) < n


def nm_mask(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """Boolean mask of the ``n`` largest magnitudes in each group of ``m`` along ``axis``.

    Shape and layout of ``w``; exactly ``n`` True per group (ties to the lower index).
    """
    axis = check_nm(w.shape, n, m, axis)
    mag = jnp.abs(jax.lax.stop_gradient(w))
    return _ungrouped(_group_mask(_grouped(mag, m, axis), n), axis)


def threshold_nm(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """S-STE's tau per group: the largest *pruned* magnitude (the (m-n)-th smallest),
    broadcast back to the shape of ``w``."""
    axis = check_nm(w.shape, n, m, axis)
    mag = _grouped(jnp.abs(w), m, axis)
    keep = _group_mask(jax.lax.stop_gradient(mag), n)
    tau = jnp.max(jnp.where(keep, jnp.zeros_like(mag), mag), axis=-1, keepdims=True)
    return _ungrouped(jnp.broadcast_to(tau, mag.shape), axis)


def soft_threshold(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """S(w) of S-STE: ``sign(w) * max(|w| - tau, 0)`` per group (docs/methods.md §1).

    The top-n entries survive shrunk by tau, the rest are exactly 0 (exactly n non-zeros
    per group when magnitudes are distinct). Continuous in ``w``.
    """
    tau = threshold_nm(w, n, m, axis)
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - tau, 0).astype(w.dtype)


def sste_scale(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """beta = <W, S(W)> / <S(W), S(W)>: the least-squares fit of S(W) to W (float32 scalar;
    float64 for float64 ``w``). S-STE computes it once at initialisation and freezes it."""
    w32 = upcast(w)
    s = soft_threshold(w32, n, m, axis)
    return jnp.vdot(w32, s) / jnp.maximum(jnp.vdot(s, s), jnp.finfo(w32.dtype).tiny)


# ----------------------------------------------------------------- straight-through forms


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def sste(w: jax.Array, beta: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """``beta * S(w)`` forward; straight-through (identity) gradient to ``w``, none to
    beta (frozen; docs/methods.md §1: beta is not applied to the gradient)."""
    return (beta * soft_threshold(w, n, m, axis)).astype(w.dtype)


def _sste_fwd(w, beta, n, m, axis):
    return sste(w, beta, n, m, axis), jnp.zeros_like(beta)


def _sste_bwd(n, m, axis, zero_beta, g):
    return g, zero_beta


sste.defvjp(_sste_fwd, _sste_bwd)


def _hard_prune(w: jax.Array, mask: jax.Array) -> jax.Array:
    """``E * w``: the entries of ``w`` outside the mask set to exactly 0."""
    return jnp.where(mask, w, jnp.zeros_like(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def ste(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """Hard N:M mask forward (``E * w``), identity gradient to the dense ``w``."""
    return _hard_prune(w, nm_mask(w, n, m, axis))


ste.defvjp(lambda w, n, m, axis: (ste(w, n, m, axis), None),
           lambda n, m, axis, _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def sr_ste(w: jax.Array, n: int = 2, m: int = 4, axis: int = 0, decay: float = 2e-4
           ) -> jax.Array:
    """SR-STE: hard mask forward; gradient ``g + decay * (1 - E) * w`` (decay on pruned
    weights only; Zhou et al. 2021, reference lambda_W = 2e-4)."""
    return _hard_prune(w, nm_mask(w, n, m, axis))


def _sr_ste_fwd(w, n, m, axis, decay):
    mask = nm_mask(w, n, m, axis)
    return _hard_prune(w, mask), (w, mask)


def _sr_ste_bwd(n, m, axis, decay, res, g):
    w, mask = res
    return (g + jnp.where(mask, jnp.zeros_like(w), decay * w).astype(g.dtype),)


sr_ste.defvjp(_sr_ste_fwd, _sr_ste_bwd)


def flip_rate(before: jax.Array, after: jax.Array, n: int = 2, m: int = 4, axis: int = 0
              ) -> jax.Array:
    """Fraction of mask entries that differ between the N:M masks of two weights."""
    return jnp.mean(nm_mask(before, n, m, axis) != nm_mask(after, n, m, axis))


# ----------------------------------------------------------------- MaskLLM


@functools.cache
def _candidates(n: int, m: int) -> np.ndarray:
    rows = [[1.0 if i in kept else 0.0 for i in range(m)]
            for kept in itertools.combinations(range(m), n)]
    return np.asarray(rows, np.float32)


def candidate_masks(n: int = 2, m: int = 4) -> np.ndarray:
    """All ``C(m, n)`` N:M patterns of one group, ``(C, m)`` float32 of 0/1, in
    lexicographic order of the kept positions (2:4: ``1100, 1010, 1001, 0110, 0101,
    0011``)."""
    if not 1 <= n < m:
        raise ValueError(f"N:M pattern {n}:{m} needs 1 <= n < m")
    return _candidates(n, m).copy()


def mask_logits_shape(shape: tuple[int, ...], n: int = 2, m: int = 4, axis: int = 0
                      ) -> tuple[int, ...]:
    """Shape of MaskLLM's logits for a weight of ``shape``: the other axes in order, then
    the group index along ``axis``, then the ``C(m, n)`` candidates. A Flax kernel
    ``(in, out)`` with ``axis=0`` has logits ``(out, in // m, C)``."""
    axis = check_nm(shape, n, m, axis)
    rest = [d for i, d in enumerate(shape) if i != axis]
    return (*rest, shape[axis] // m, math.comb(m, n))


def _mask_from_probs(probs: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """``(..., G, C)`` candidate weights -> the mixed mask in the weight's layout."""
    return _ungrouped(probs @ jnp.asarray(_candidates(n, m)), axis)


def gumbel_nm_mask(logits: jax.Array, key: jax.Array, tau: float | jax.Array,
                   kappa: float | jax.Array, *, n: int = 2, m: int = 4, axis: int = 0,
                   hard: bool = False) -> jax.Array:
    """MaskLLM's differentiable training mask (docs/methods.md §2; Fang et al. 2024, eq. 3-4).

    Per group ``y = softmax((kappa * logits + g) / tau)`` with Gumbel noise ``g`` drawn
    from ``key``, and the mask is the mixture ``sum_i y_i * candidate_i``. ``logits``:
    :func:`mask_logits_shape` of the weight; the result has the weight's layout (``axis``
    = the group axis), float32, values in [0, 1] with group sums exactly ``n``.
    ``hard=True``: the forward uses the one-hot of the sampled candidate (a valid N:M
    mask), the gradient is the soft one (straight-through Gumbel-softmax).
    """
    logits = logits.astype(jnp.float32)
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
    probs = jax.nn.softmax((kappa * logits + noise) / tau, axis=-1)
    if hard:
        one_hot = jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1], dtype=probs.dtype)
        probs = straight_through(probs, one_hot)
    return _mask_from_probs(probs, n, m, axis)


def argmax_nm_mask(logits: jax.Array, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    """MaskLLM's inference mask: the most likely candidate of every group, float32 0/1 in
    the weight's layout (exactly ``n`` ones per group; no gradient)."""
    logits = jax.lax.stop_gradient(logits)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    return _mask_from_probs(one_hot, n, m, axis)


def init_mask_logits(key: jax.Array, w: jax.Array, n: int = 2, m: int = 4, axis: int = 0,
                     std: float = 0.01, prior: str = "magnitude",
                     prior_strength: float = 3.0) -> jax.Array:
    """Initial MaskLLM logits for weight ``w``: ``N(0, std)``, plus with
    ``prior="magnitude"`` a bias towards the magnitude (top-n) mask ``M0`` of ``w``:
    ``logits_i += prior_strength * std * <candidate_i, M0>``, where the inner product counts
    the kept positions candidate i shares with the prior (0..n). This is the rule of the
    reference code (NVlabs/MaskLLM ``init_diff_mask_from_prior``: ``gate += (similarity - 1)
    * std(gate) * strength``, recipe strength 3) up to the ``-1``, a per-group constant the
    softmax ignores, and with the nominal ``std`` in place of the drawn logits' sample std
    (they differ by ~1/sqrt(2 * logits.size): 0.2 % for a 512 x 128 kernel). With the
    defaults (strength 3) and ``kappa = 100`` the prior candidate starts ``exp(6)`` times more
    likely than a disjoint one and ``exp(3)`` than a neighbour; the argmax is the magnitude
    mask in ~97% of 2:4 groups (all of them from strength ~10). Returns float32 of
    :func:`mask_logits_shape`."""
    shape = mask_logits_shape(w.shape, n, m, axis)
    logits = std * jax.random.normal(key, shape, jnp.float32)
    if prior == "none":
        return logits
    if prior != "magnitude":
        raise ValueError(f"prior '{prior}' is not one of {'|'.join(MASK_PRIORS)}")
    axis = check_nm(w.shape, n, m, axis)
    m0 = _grouped(nm_mask(w, n, m, axis).astype(jnp.float32), m, axis)  # (..., G, m)
    similarity = m0 @ jnp.asarray(_candidates(n, m)).T  # (..., G, C)
    return logits + prior_strength * std * similarity


def mask_entropy(logits: jax.Array, kappa: float | jax.Array) -> jax.Array:
    """Mean entropy (nats) of the candidate distributions ``softmax(kappa * logits)`` over
    all groups; ``log C(m, n)`` when undecided, 0 when every group is certain."""
    logp = jax.nn.log_softmax(kappa * logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def linear_schedule(start: float, end: float, step: jax.Array | int, total: int
                    ) -> jax.Array:
    """``start`` at step 0 to ``end`` at step ``total`` (held after), float32; MaskLLM's
    tau, kappa and regulariser schedules."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total, 1), 0.0, 1.0)
    return jnp.float32(start) + (jnp.float32(end) - jnp.float32(start)) * frac


# ----------------------------------------------------------------- MVUE


def mvue24(g: jax.Array, key: jax.Array, axis: int = 0, eps: float = 1e-12) -> jax.Array:
    """Unbiased 2:4 estimator of ``g`` along ``axis`` (docs/methods.md §1; Chmiel et al.).

    Per group of 4 with ``a_i = |g_i| + eps`` and ``S = sum a``: the first kept index is
    drawn with probability ``a_i / S``, the second from the other three proportionally to
    ``a``. Kept entries are divided by their inclusion probability
    ``p_i = a_i/S + sum_{j != i} (a_j/S) a_i / (S - a_j)``, so ``E[out] = g``; exactly two
    entries per group are kept (the others are 0). Computed in float32 (float64 for a
    float64 ``g``), returned in the dtype of ``g``.

    Layout: the four members of a group are handled as four ``(groups, rest)`` slices so
    that every operation is a wide elementwise one (no size-4 minor axis, no transposes when
    ``axis`` is the leading axis, as for dZ along tokens).
    """
    axis = check_nm(g.shape, 2, 4, axis)
    moved = jnp.moveaxis(g, axis, 0)
    x = upcast(moved.reshape(moved.shape[0] // 4, 4, -1))
    xs = [x[:, k] for k in range(4)]  # four (G, R) slices
    a = [jnp.abs(v) + eps for v in xs]
    total = a[0] + a[1] + a[2] + a[3]
    u1, u2 = jax.random.uniform(key, (2, *total.shape), x.dtype)

    def draw(weights, target):
        # index i with cdf[i-1] <= target < cdf[i]; zero weights are skipped because their
        # cdf step is empty (>= passes them)
        c0 = weights[0]
        c1 = c0 + weights[1]
        c2 = c1 + weights[2]
        return ((target >= c0).astype(jnp.int32) + (target >= c1) + (target >= c2))

    first = draw(a, u1 * total)
    rest = [jnp.where(first == k, 0.0, a[k]) for k in range(4)]
    second = draw(rest, u2 * (total - sum(jnp.where(first == k, a[k], 0.0) for k in range(4))))
    # Round-off can push the target to the very top onto the emptied last entry.
    second = jnp.where(second == first, 2, second)
    pj = [ak / total for ak in a]  # probability that j is drawn first
    r = [pj[k] / jnp.maximum(total - a[k], eps) for k in range(4)]
    r_sum = r[0] + r[1] + r[2] + r[3]
    out = []
    for k in range(4):
        p = pj[k] + a[k] * (r_sum - r[k])
        kept = (first == k) | (second == k)
        out.append(jnp.where(kept, xs[k] / p, 0.0))
    result = jnp.stack(out, axis=1).reshape(moved.shape)
    return jnp.moveaxis(result, 0, axis).astype(g.dtype)
