"""Gain-cell attention: attention computed in analog gain-cell memories (Leroux, Manea et
al., arXiv 2409.19315, Nature Computational Science 2025; constants from the public code
NathanLeroux-git/GainCellAttention, ``modules/model_gpt.py``, class ``LinearDRAMAttention``).

Keys and values are stored as capacitor voltages in gain cells, queries are applied as
input pulses, and the charge leaks. There is no softmax: the scores saturate in a bounded
non-linearity, and the weighted sum is read out per memory array of ``array`` tokens with
a bounded, quantised converter. Per head ``h``, with ``q, k, v`` ``(B, T, H, D)``:

- inputs, with straight-through quantisers (``Q_n`` rounds to ``n`` equally spaced levels
  of the interval; its gradient is the identity, the clip's is zero outside)::

      q~ = Q_16(clip(a_q q + b_q, 0, 1)),  k~ = Q_8(clip(a_k k + b_k, 0, 0.9)),
      v~ = Q_8(clip(a_v v + b_v, 0, 0.9))

- decay and sliding window: ``D_ij = delta^(i - j)`` for ``i - W < j <= i``, else 0, with
  ``delta = exp(-decay_rate)`` (charge leakage between writing token j and reading it at i);
- scores ``S_ij = g * q~_i . (k~_j - 0.45) * D_ij`` and ``A = clip(S / S_sat, 0, 1)`` in
  place of the softmax (``g = 19.3`` the cell's linear-fit gain, ``S_sat = 80``);
- output per array tile ``t`` of ``array`` key positions (absolute, ``j // array``)::

      O^t_i = Q_32(clip(g * sum_{j in t} A_ij D_ij (v~_j - 0.45) / S_av, -1, 1))

  (``S_av = 40``; the stored values leak too, hence the second ``D``), ``O = sum_t O^t``
  over the tiles holding at least one key visible to ``i``, and ``y = a_o O + b_o``.

``a, b`` are trainable per-head scalars, initialised as the reference does (``a = 1``;
``b_q = 0``, ``b_k = b_v = 0.45``; ``a_o = 1``, ``b_o = 0``) - or set from statistics of a
softmax teacher by :meth:`GainCell.calibrate` (``sparsejax.adapt``).

Read noise (``read_noise``, the reference's ``ReadNoise`` module, which it applies in
evaluation only at an SNR of 10 dB, i.e. ``read_noise = 0.1``): every analog read gets
additive Gaussian noise whose energy is ``read_noise`` times the read's own energy - per
query row of visible scores ``S / S_sat`` before the clip, and per tile read-out row over
``D`` before the clip -, ``x + sqrt(read_noise |x|^2 / |z|^2) z`` with ``z ~ N(0, I)`` on
the visible entries; the noise carries no gradient. It is on in evaluation, and in
training too with ``read_noise_train: true`` (noise-aware adaptation).

``cell: nonlinear`` replaces each product by the reference's fitted cell response, a
polynomial of order 3 in the stored voltage ``u = k~ - 0.45`` (and ``v~ - 0.45``), linear in
the input: ``S_ij = sum_p C_p sum_d q~_id u_jd^p D_ij^p`` with ``C_p = sum_r c_pr 0.9^r``
(the code's ten coefficients), and the same for the read-out; its gradient is the
linear model's (the paper's surrogate).

Deviations: the reference quantises with ``step * round(x / step)``, which on [-1, 1]
with 32 levels yields 33 values (``round(+-15.5) = +-16``); here ``Q_n`` maps onto exactly
``n`` levels, ``lo + step * round((x - lo) / step)``. With an even number of output
levels 0 is then no level (it reads ``1/31``), so tiles with no visible key - future
tokens, or all older than the window - are not read at all; the reference sums their
(exact) zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.estimators import straight_through
from sparsejax.transforms.base import (
    AttentionCalibration,
    AttentionData,
    AttentionMethod,
    Context,
    Metrics,
    Site,
    SpecError,
    State,
    Transform,
    View,
    head_statistics,
    register,
)

__all__ = ["CELL_POLYNOMIAL", "GainCell", "add_read_noise", "decay_window", "gaincell_attention",
           "gaincell_readout", "gaincell_scores", "head_statistics", "quantize_levels"]

STORED_OFFSET = 0.45  # the cell's mid voltage: k~ - 0.45 is the signed stored weight
K_RANGE = (0.0, 0.9)  # stored voltage range (k~, v~)
Q_RANGE = (0.0, 1.0)  # input pulse range (q~, and the scores A)
OUT_RANGE = (-1.0, 1.0)  # converter range of each tile's read-out
# The reference's fit of the cell's response: c[idx] for (stored power p, input power r),
# idx running over p = 0..3, r = 0..3-p; the input enters at its maximum 0.9 (x_max).
_CELL_FIT = (0.17393044, 0.15653739, 0.14088365, 0.12679529, 5.51975209, 4.96777688,
             4.4709992, -1.44776001, -1.30298401, 46.05483778)


def _cell_polynomial() -> tuple[float, ...]:
    coeffs, idx = [], 0
    for p in range(4):
        total = 0.0
        for r in range(4 - p):
            total += _CELL_FIT[idx] * 0.9 ** r
            idx += 1
        coeffs.append(total)
    return tuple(coeffs)


CELL_POLYNOMIAL = _cell_polynomial()  # C_0..C_3 of the stored voltage


def quantize_levels(x: jax.Array, lo: float, hi: float, levels: int) -> jax.Array:
    """``x`` (already in ``[lo, hi]``) rounded to ``levels`` equally spaced values from
    ``lo`` to ``hi``; straight-through gradient (identity)."""
    step = (hi - lo) / (levels - 1)
    return straight_through(x, lo + step * jnp.round((x - lo) / step))


def decay_window(q_positions: jax.Array, n_keys: int, window: int, decay_rate: float
                 ) -> jax.Array:
    """``D`` ``(T, L)``: ``exp(-decay_rate)^(i - j)`` where key ``j`` is visible to the query
    at position ``i`` (``i - window < j <= i``), else 0; ``q_positions`` ``(T,)``."""
    lag = q_positions[:, None] - jnp.arange(n_keys)[None, :]
    visible = (lag >= 0) & (lag < window)
    return jnp.where(visible, jnp.exp(-decay_rate * jnp.maximum(lag, 0).astype(jnp.float32)),
                     0.0)


def _cell_product(spec: str, x: jax.Array, u: jax.Array, weight: jax.Array, gain: float,
                  cell: str) -> jax.Array:
    """``einsum(spec)`` of inputs ``x`` with stored voltages ``u`` (offset removed) weighted
    by ``weight`` (``D``, broadcast by the spec) in the cell model ``cell``: linear,
    ``gain * x u D``, or the fitted polynomial with the linear model's gradient."""
    linear = gain * jnp.einsum(spec, x, u, weight)
    if cell == "linear":
        return linear
    visible = (weight > 0).astype(weight.dtype)  # D^0: 1 inside the window only
    exact = sum(c * jnp.einsum(spec, x, u ** p, weight ** p if p else visible)
                for p, c in enumerate(CELL_POLYNOMIAL))
    return straight_through(linear, exact)


def _inputs(q: jax.Array, k: jax.Array, v: jax.Array, params: State, q_levels: int,
            kv_levels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q~``, ``k~ - 0.45``, ``v~ - 0.45``: the bounded, quantised inputs (float32)."""

    def affine(name: str, x: jax.Array) -> jax.Array:  # per head: (H, 1) over (..., H, D)
        return params[f"a_{name}"][:, None] * x.astype(jnp.float32) + params[f"b_{name}"][:, None]

    qt = quantize_levels(jnp.clip(affine("q", q), *Q_RANGE), *Q_RANGE, q_levels)
    kt = quantize_levels(jnp.clip(affine("k", k), *K_RANGE), *K_RANGE, kv_levels)
    vt = quantize_levels(jnp.clip(affine("v", v), *K_RANGE), *K_RANGE, kv_levels)
    return qt, kt - STORED_OFFSET, vt - STORED_OFFSET


def add_read_noise(x: jax.Array, where: jax.Array, ratio: float, key: jax.Array
                   ) -> jax.Array:
    """``x + sqrt(ratio |x|^2 / |z|^2) z`` per row of the last axis, ``z ~ N(0, I)`` on the
    entries ``where`` (broadcast to ``x``) and 0 elsewhere: additive noise with ``ratio``
    times the row's energy (an SNR of ``-10 log10(ratio)`` dB; torchaudio's ``add_noise``,
    which the reference uses). The noise carries no gradient."""
    z = jax.random.normal(key, x.shape, jnp.float32) * where
    energy_x = jnp.sum(jnp.square(jax.lax.stop_gradient(x)), axis=-1, keepdims=True)
    energy_z = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    scale = jnp.sqrt(ratio * energy_x / jnp.maximum(energy_z, 1e-30))
    return x + jax.lax.stop_gradient(scale * z)


def gaincell_scores(qt: jax.Array, stored_k: jax.Array, decay: jax.Array, *, gain: float,
                    score_saturation: float, cell: str = "linear", read_noise: float = 0.0,
                    noise_key: jax.Array | None = None) -> jax.Array:
    """``A = clip(S / S_sat, 0, 1)`` ``(B, H, T, L)`` from ``q~`` ``(B, T, H, D)``,
    ``k~ - 0.45`` ``(B, L, H, D)`` and ``D`` ``(T, L)`` (:func:`decay_window`); exactly 0
    where ``D`` hides the key. With ``noise_key``, :func:`add_read_noise` of ``read_noise``
    on each query's visible ``S / S_sat`` before the clip."""
    scores = _cell_product("bthd,bjhd,tj->bhtj", qt, stored_k, decay, gain, cell)
    scores = scores / score_saturation
    if noise_key is not None and read_noise > 0:
        scores = add_read_noise(scores, decay > 0, read_noise, noise_key)
    return jnp.clip(scores, *Q_RANGE) * (decay > 0)


def gaincell_readout(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     params: State, *, window: int, decay_rate: float, array: int,
                     q_levels: int, kv_levels: int, out_levels: int, gain: float,
                     score_saturation: float, output_saturation: float,
                     cell: str = "linear", read_noise: float = 0.0,
                     noise_key: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """The summed read-out ``O`` ``(B, T, H, D)`` (float32) of gain-cell attention before
    the output affine (:func:`gaincell_attention`), and the call's metrics: the fractions
    of visible scores at saturation (``A = 1``) and of tile read-outs clipped. With
    ``noise_key``, both reads get ``read_noise`` (:func:`add_read_noise`)."""
    qt, stored_k, stored_v = _inputs(q, k, v, params, q_levels, kv_levels)
    n_keys = k.shape[1]
    decay = decay_window(q_positions, n_keys, window, decay_rate)  # (T, L)
    visible = decay > 0
    score_key, out_key = (jax.random.split(noise_key) if noise_key is not None
                          else (None, None))
    weights = gaincell_scores(qt, stored_k, decay, gain=gain,
                              score_saturation=score_saturation, cell=cell,
                              read_noise=read_noise, noise_key=score_key)
    tiles = -(-n_keys // array)
    pad = tiles * array - n_keys
    saturated = jnp.sum((weights >= Q_RANGE[1]) & visible) / (
        jnp.maximum(jnp.sum(visible), 1) * weights.shape[0] * weights.shape[1])
    weights = jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, pad)))
    weights = weights.reshape(*weights.shape[:3], tiles, array)  # (B, H, T, n, a)
    decay_tiles = jnp.pad(decay, ((0, 0), (0, pad))).reshape(-1, tiles, array)
    stored = jnp.pad(stored_v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    stored = stored.reshape(stored.shape[0], tiles, array, *stored.shape[2:])
    per_tile = _cell_product("bhtnj,bnjhd,tnj->bthnd", weights, stored, decay_tiles, gain,
                             cell) / output_saturation
    # only the arrays holding a visible key are read (the converter has no exact zero
    # with an even number of levels: an idle array would add a bias of half a step)
    read = jnp.any(decay_tiles > 0, axis=-1)[None, :, None, :, None]  # (1, T, 1, n, 1)
    if out_key is not None and read_noise > 0:
        per_tile = add_read_noise(per_tile, read, read_noise, out_key)
    clipped = jnp.mean(jnp.abs(per_tile) > OUT_RANGE[1])
    per_tile = quantize_levels(jnp.clip(per_tile, *OUT_RANGE), *OUT_RANGE, out_levels)
    per_tile = per_tile * read
    metrics = {"score_saturated": jax.lax.stop_gradient(saturated),
               "output_clipped": jax.lax.stop_gradient(clipped)}
    return per_tile.sum(axis=3), metrics


def gaincell_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                       params: State, **settings) -> jax.Array:
    """Gain-cell attention (module docstring). ``q`` ``(B, T, H, D)`` at ``q_positions``
    ``(T,)``; ``k``, ``v`` ``(B, L, H, D)`` at positions ``0 .. L-1`` (the whole sequence,
    or a cache whose unwritten positions are masked by causality). ``params``: per-head
    ``a_q, b_q, a_k, b_k, a_v, b_v, a_o, b_o`` ``(H,)``; ``settings``: the keywords of
    :func:`gaincell_readout`. Returns ``y = a_o O + b_o`` ``(B, T, H, D)`` (float32)."""
    out, _ = gaincell_readout(q, k, v, q_positions, params, **settings)
    return params["a_o"][:, None] * out + params["b_o"][:, None]


@register("attention", "gaincell")
@dataclass(frozen=True, kw_only=True)
class GainCell(AttentionCalibration, AttentionMethod, Transform):
    """Gain-cell attention in place of the softmax of an attention module (module
    docstring). Fields: the sliding ``window`` (tokens), the leakage ``decay_rate`` per
    token (``delta = exp(-decay_rate)``; the reference's 1.6e-4), the memory ``array``
    length (tokens per tile), the levels of the query, key / value and output converters,
    the cell ``gain`` and the saturations of scores and read-out, the ``cell`` model
    (``linear`` | ``nonlinear``), and the adaptation from a softmax teacher:
    ``calib_batches`` training batches (0: keep the reference's initial ``a, b``) and
    ``calib_sigmas`` - the input affines put the mean of q, k, v at the centre of their
    range and ``calib_sigmas`` standard deviations at its edge; ``read_noise``, the
    noise-to-signal energy ratio of each analog read (0: off; the reference's 0.1 is
    10 dB), in evaluation and, with ``read_noise_train``, in training. The draws come from
    the layer's key, a checkpointed ``count`` of noisy training calls (a resumed run draws
    what an unbroken one does) and the first query position (fresh per decoding step); an
    evaluation draws with the current ``count`` (common random numbers across the
    evaluations of one checkpoint)."""

    window: int = 1024
    decay_rate: float = 1.6e-4
    array: int = 64
    q_levels: int = 16
    kv_levels: int = 8
    out_levels: int = 32
    gain: float = 19.3
    score_saturation: float = 80.0
    output_saturation: float = 40.0
    cell: str = "linear"
    calib_batches: int = 8
    calib_sigmas: float = 2.0
    read_noise: float = 0.0
    read_noise_train: bool = False

    roles = ("attention",)
    per_layer_metrics = ("score_saturated", "output_clipped")
    # a, b set from a teacher's statistics (AttentionCalibration): train.init_from carries
    # them from a run of the same method instead of recalibrating
    matches_teacher_outputs = True

    def check(self) -> None:
        for name in ("window", "array"):
            if getattr(self, name) < 1:
                raise SpecError(name, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("q_levels", "kv_levels", "out_levels"):
            if getattr(self, name) < 2:
                raise SpecError(name, f"{name} must be at least 2, got {getattr(self, name)}")
        for name in ("gain", "score_saturation", "output_saturation", "calib_sigmas"):
            if getattr(self, name) <= 0:
                raise SpecError(name, f"{name} must be positive, got {getattr(self, name)}")
        if self.decay_rate < 0:
            raise SpecError("decay_rate", f"decay_rate must be >= 0, got {self.decay_rate}")
        if self.cell not in ("linear", "nonlinear"):
            raise SpecError("cell", f"cell must be linear|nonlinear, got '{self.cell}'")
        if self.read_noise < 0:
            raise SpecError("read_noise", f"read_noise must be >= 0, got {self.read_noise}")
        if self.read_noise_train and not self.read_noise:
            raise SpecError("read_noise_train", "read_noise_train needs read_noise > 0")
        if self.calib_batches < 0:
            raise SpecError("calib_batches", f"calib_batches must be >= 0, got "
                            f"{self.calib_batches}")

    def check_site(self, site: Site) -> None:
        if len(site.shape) != 2:
            raise ValueError(f"gain-cell attention acts on (heads, head_dim), got {site.shape}")

    def params(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        heads = site.shape[0]
        ones, zeros = np.ones(heads, np.float32), np.zeros(heads, np.float32)
        return {"a_q": ones, "b_q": zeros, "a_k": ones, "b_k": zeros + STORED_OFFSET,
                "a_v": ones, "b_v": zeros + STORED_OFFSET, "a_o": ones, "b_o": zeros}

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        state = {"calibrated": jnp.zeros((), jnp.int32)}
        if self.read_noise:
            state["count"] = jnp.zeros((), jnp.int32)  # noisy training calls so far
        return state

    def _settings(self) -> dict:
        return {"window": self.window, "decay_rate": self.decay_rate, "array": self.array,
                "q_levels": self.q_levels, "kv_levels": self.kv_levels,
                "out_levels": self.out_levels, "gain": self.gain,
                "score_saturation": self.score_saturation,
                "output_saturation": self.output_saturation, "cell": self.cell}

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               params: State, state: State, site: Site, ctx: Context,
               x: jax.Array | None = None) -> tuple[jax.Array, State, Metrics]:
        noisy = self.read_noise > 0 and (self.read_noise_train or not ctx.training)
        # the first query position too: cached decoding draws afresh at every step
        noise_key = (jax.random.fold_in(jax.random.fold_in(ctx.key, state["count"]),
                                        q_positions[0]) if noisy else None)
        out, metrics = gaincell_readout(q, k, v, q_positions, params, **self._settings(),
                                        read_noise=self.read_noise, noise_key=noise_key)
        y = params["a_o"][:, None] * out + params["b_o"][:, None]
        if noisy and ctx.training:
            state = {**state, "count": state["count"] + 1}
        return y.astype(q.dtype), state, metrics

    def calibrate(self, site: Site, view: View, data: AttentionData) -> View:
        """The paper's statistics-matching initialisation, from calibration data ``data``:
        ``q``, ``k``, ``v`` ``(N, T, H, D)`` reaching this layer, their ``positions``
        ``(T,)`` and the softmax teacher's per-head output statistics ``target_mean``,
        ``target_std`` ``(H,)``. Per head, ``a x + b`` puts the mean of each input at the
        centre ``c`` of its range (0.5 for q, 0.45 for k, v) and ``calib_sigmas`` standard
        deviations at its edge (``a = c / (calib_sigmas * std)``, ``b = c - a * mean``);
        then ``a_o, b_o`` give the read-out ``O`` of those inputs the teacher's mean and
        standard deviation. Returns the view with the new params, ``calibrated = 1``."""
        params = dict(view.params)
        for name, centre in (("q", 0.5), ("k", STORED_OFFSET), ("v", STORED_OFFSET)):
            mean, std = head_statistics(getattr(data, name))
            a = centre / (self.calib_sigmas * jnp.maximum(std, 1e-12))
            params[f"a_{name}"], params[f"b_{name}"] = a, centre - a * mean
        raw, _ = gaincell_readout(data.q, data.k, data.v, data.positions, params,
                                  **self._settings())
        mean, std = head_statistics(raw)
        alive = std > 1e-12
        a_o = jnp.where(alive, data.target_std / jnp.where(alive, std, 1.0), 1.0)
        params["a_o"], params["b_o"] = a_o, data.target_mean - a_o * mean
        return View(view.x, params, {**view.state, "calibrated": jnp.ones((), jnp.int32)})

