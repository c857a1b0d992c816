"""CSKV: channel shrinking of the KV cache with a bi-branch cache (Wang et al., arXiv
2409.10593; public code wln20/CSKV, ``cskv_src/``).

Keys and values get low-rank projections from the attention module's input ``X``
``(B, L, C)``: ``K ~ X A_k B_k + b_k``, ``A_k`` ``(C, r_k)``, ``B_k`` ``(r_k, C)``
(``r_k = round(k_density * C)``), the same for V. The cache keeps two branches:

- the last ``window`` tokens with their exact keys and values;
- every older token only as ``C_k = X A_k`` and ``C_v = X A_v`` - optionally quantised
  as in KIVI: keys per channel over groups of ``group`` consecutive tokens, values per
  token, asymmetric ``quant_bits``-bit min/max with float16 scales - reconstructed as
  ``C B + b`` when attended.

Each query thus attends to exact keys inside its window and reconstructed keys outside
it (``bi-branch``), in teacher-forced evaluation and in cached decoding alike (tested
equal).

Initialisation (ASVD, from calibration data; :meth:`CSKV.calibrate`): ``s`` = mean
``|x|`` per input channel, ``U S V^T = SVD(diag(s^alpha) W)``, ``A = diag(s^-alpha) U_r
S_r^(1/2)``, ``B = S_r^(1/2) V_r^T`` (``alpha = 0.5``). Training: only ``A``, ``B`` (the
method's optimiser group freezes the rest) on the layer-wise reconstruction loss
``recon_weight * (mean (X A_k B_k - X W_k)^2 + mean (X A_v B_v - X W_v)^2)``, a loss term;
with ``train_lm`` the training forward also attends bi-branch, so the language-model loss
reaches ``A``, ``B`` as well.

Deviations: the reference trains with the reconstruction loss on the full sequence and
evaluates with its own cache class; here the same functions serve both. Key-quantisation
groups are fixed by absolute position (``j // group``), so a token's codes never depend
on later tokens once its group is complete - and a token is only read from the compressed
branch after its group is complete (``group <= window``, checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.estimators import straight_through
from sparsejax.transforms.base import (
    AttentionCalibration,
    AttentionData,
    CachedAttention,
    Context,
    Metrics,
    ParamGroup,
    Site,
    SpecError,
    State,
    Transform,
    View,
    register,
)

__all__ = ["CSKV", "asvd_factors", "bibranch_attention", "cache_bytes_per_old_token",
           "compressed_kv", "quantize_per_channel_groups", "quantize_per_token"]

SCALE_DTYPE = jnp.float16  # KIVI's scales and zero points


def asvd_factors(w: jax.Array, act_abs_mean: jax.Array, rank: int, alpha: float = 0.5
                 ) -> tuple[jax.Array, jax.Array]:
    """ASVD: ``(A, B)`` with ``A = diag(s^-alpha) U_r S_r^(1/2)`` ``(in, r)`` and
    ``B = S_r^(1/2) V_r^T`` ``(r, out)`` from ``U S V^T = SVD(diag(s^alpha) w)``, ``w``
    ``(in, out)``, ``s = act_abs_mean`` ``(in,)`` (clipped below at 1e-6). Exact
    (``A B = w``) at full rank."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.maximum(jnp.asarray(act_abs_mean, jnp.float32), 1e-6) ** alpha
    u, s, vt = jnp.linalg.svd(scale[:, None] * w, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return (u[:, :rank] * root) / scale[:, None], root[:, None] * vt[:rank]


def _minmax_quantize(c: jax.Array, lo: jax.Array, hi: jax.Array, bits: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes, scale, zero)``: asymmetric ``bits``-bit codes of ``c`` between ``lo`` and
    ``hi`` (broadcast), with the scale and zero point rounded to float16 first."""
    levels = 2 ** bits - 1
    zero = lo.astype(SCALE_DTYPE).astype(jnp.float32)
    scale = ((hi - lo) / levels).astype(SCALE_DTYPE).astype(jnp.float32)
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((c - zero) / safe), 0, levels)
    return codes, scale, zero


def quantize_per_channel_groups(c: jax.Array, bits: int, group: int
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KIVI keys: ``c`` ``(B, L, r)`` with ``L`` a multiple of ``group``; per channel and
    group of ``group`` consecutive positions, min/max ``bits``-bit codes. Returns
    ``(codes (B, L, r), scale (B, L / group, r), zero (B, L / group, r))``."""
    b, n, r = c.shape
    grouped = c.reshape(b, n // group, group, r)
    codes, scale, zero = _minmax_quantize(grouped, grouped.min(2, keepdims=True),
                                          grouped.max(2, keepdims=True), bits)
    return codes.reshape(b, n, r), scale[:, :, 0], zero[:, :, 0]


def quantize_per_token(c: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KIVI values: ``c`` ``(B, L, r)`` quantised per token over its channels. Returns
    ``(codes (B, L, r), scale (B, L, 1), zero (B, L, 1))``."""
    return _minmax_quantize(c, c.min(-1, keepdims=True), c.max(-1, keepdims=True), bits)


def _fake_quantized_keys(c: jax.Array, bits: int, group: int) -> jax.Array:
    n = c.shape[1]
    pad = -n % group
    padded = jnp.pad(c, ((0, 0), (0, pad), (0, 0)))
    codes, scale, zero = quantize_per_channel_groups(padded, bits, group)
    value = codes * jnp.repeat(scale, group, axis=1) + jnp.repeat(zero, group, axis=1)
    return straight_through(c, value[:, :n])


def _fake_quantized_values(c: jax.Array, bits: int) -> jax.Array:
    codes, scale, zero = quantize_per_token(c, bits)
    return straight_through(c, codes * scale + zero)


def compressed_kv(x: jax.Array, params: State, state: State, heads: int, *, bits: int,
                  group: int) -> tuple[jax.Array, jax.Array]:
    """The reconstructed keys and values ``(B, L, H, D)`` of the module input ``x``
    ``(B, L, C)``: ``Q(x A) B + b`` (``Q``: KIVI quantisation when ``bits``)."""
    x = x.astype(jnp.float32)
    c_k, c_v = x @ params["a_k"], x @ params["a_v"]
    if bits:
        c_k, c_v = _fake_quantized_keys(c_k, bits, group), _fake_quantized_values(c_v, bits)
    k = c_k @ params["b_k"] + state["bias_k"]
    v = c_v @ params["b_v"] + state["bias_v"]
    return (t.reshape(*t.shape[:2], heads, -1) for t in (k, v))


def bibranch_attention(q: jax.Array, keys: list[tuple[jax.Array, jax.Array, jax.Array]],
                       q_positions: jax.Array) -> jax.Array:
    """Causal softmax attention of ``q`` ``(B, T, H, D)`` at ``q_positions`` ``(T,)`` over
    several key sets ``[(k, v, visible)]``: ``k``, ``v`` ``(B, L_s, H, D)`` and
    ``visible`` ``(T, L_s)`` - which query may see which entry. One softmax over all."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    q = q.astype(jnp.float32)
    scores = [jnp.where(vis[None, None], jnp.einsum("bthd,bjhd->bhtj", q, k.astype(q.dtype))
                        * scale, -jnp.inf) for k, _, vis in keys]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for (_, v, vis) in keys:
        width = vis.shape[1]
        out = out + jnp.einsum("bhtj,bjhd->bthd", probs[..., start:start + width],
                               v.astype(q.dtype))
        start += width
    return out


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """``8 // bits`` codes of ``bits`` bits (2, 4 or 8) per byte along the last axis
    (zero-padded to a whole byte): ``(..., r)`` -> ``(..., ceil(r * bits / 8))`` uint8,
    code ``i`` of a byte in bits ``[i * bits, (i + 1) * bits)``."""
    per_byte = 8 // bits
    codes = codes.astype(jnp.uint8)
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    # the shifted codes occupy disjoint bits, so their sum is their bitwise or
    return jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int, width: int) -> jax.Array:
    """The inverse of :func:`pack_codes`: the first ``width`` codes as float32."""
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    codes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :width].astype(jnp.float32)


@register("attention", "cskv")
@dataclass(frozen=True, kw_only=True)
class CSKV(AttentionCalibration, CachedAttention, Transform):
    """CSKV (module docstring). ``k_density``, ``v_density``: ``r / C`` of the key and
    value projections (the reference code's defaults 0.25 and 0.75); ``window``: exact
    recent tokens; ``quant_bits``: 0 (off), 2, 4 or 8 for the compressed branch, keys in
    groups of ``group`` tokens (at most ``window``); ``alpha``: ASVD's exponent;
    ``calib_batches``: training batches for the ASVD statistics at the start of a run
    with ``train.init_from``; ``recon_weight``: weight of the reconstruction loss;
    ``train_lm``: attend bi-branch in training too (the LM loss then trains A, B)."""

    k_density: float = 0.25
    v_density: float = 0.75
    window: int = 32
    quant_bits: int = 0
    group: int = 32
    alpha: float = 0.5
    calib_batches: int = 8
    recon_weight: float = 1.0
    train_lm: bool = False

    roles = ("attention",)
    loss_terms = ("reconstruction",)
    # A, B from ASVD (AttentionCalibration): train.init_from carries them from a CSKV run
    requires_init_from = True  # ASVD factorises the trained projections

    def check(self) -> None:
        for name in ("k_density", "v_density"):
            if not 0 < getattr(self, name) <= 1:
                raise SpecError(name, f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.window < 1:
            raise SpecError("window", f"window must be at least 1, got {self.window}")
        if self.quant_bits not in (0, 2, 4, 8):
            raise SpecError("quant_bits", f"quant_bits must be 0, 2, 4 or 8, got "
                            f"{self.quant_bits}")
        if self.quant_bits and not 1 <= self.group <= self.window:
            raise SpecError("group", f"group must be in [1, window={self.window}] (a key "
                            f"is read compressed only once its group is complete), got "
                            f"{self.group}")
        for name in ("calib_batches", "alpha", "recon_weight"):
            if getattr(self, name) < 0:
                raise SpecError(name, f"{name} must be >= 0, got {getattr(self, name)}")

    def ranks(self, site: Site) -> tuple[int, int]:
        width = site.shape[0] * site.shape[1]
        return (max(1, round(self.k_density * width)), max(1, round(self.v_density * width)))

    def params(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        width = site.shape[0] * site.shape[1]
        r_k, r_v = self.ranks(site)
        keys = jax.random.split(key, 4)
        init = [(width, r_k), (r_k, width), (width, r_v), (r_v, width)]
        return {name: jax.random.normal(k, shape) / np.sqrt(shape[0])
                for name, k, shape in zip(("a_k", "b_k", "a_v", "b_v"), keys, init,
                                          strict=True)}

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        width = site.shape[0] * site.shape[1]
        return {"bias_k": jnp.zeros(width), "bias_v": jnp.zeros(width),
                "calibrated": jnp.zeros((), jnp.int32)}

    def param_group(self) -> ParamGroup:
        return ParamGroup("cskv", freeze_others=True)

    # ------------------------------------------------------------------ teacher-forced
    def _reconstruction(self, x: jax.Array, k: jax.Array, v: jax.Array, params: State,
                        state: State) -> jax.Array:
        """``mean (X A_k B_k - (K - b_k))^2 + mean (X A_v B_v - (V - b_v))^2`` (the
        targets carry no gradient)."""
        x = x.astype(jnp.float32)
        total = 0.0
        for name, target in (("k", k), ("v", v)):
            target = jax.lax.stop_gradient(target.reshape(*target.shape[:2], -1)
                                           .astype(jnp.float32) - state[f"bias_{name}"])
            total = total + jnp.mean(jnp.square(x @ params[f"a_{name}"] @ params[f"b_{name}"]
                                                - target))
        return self.recon_weight * total

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               params: State, state: State, site: Site, ctx: Context,
               x: jax.Array | None = None) -> tuple[jax.Array, State, Metrics]:
        if x is None or x.shape[-1] != site.shape[0] * site.shape[1]:
            raise ValueError("cskv needs the attention module's input x (B, L, heads * "
                             "head_dim)")
        metrics = {"reconstruction": self._reconstruction(x, k, v, params, state)}
        n_keys = k.shape[1]
        lag = q_positions[:, None] - jnp.arange(n_keys)[None, :]
        if ctx.training and not self.train_lm:  # exact attention; A, B learn from the loss
            y = bibranch_attention(q, [(k, v, lag >= 0)], q_positions)
            return y.astype(q.dtype), state, metrics
        k_hat, v_hat = compressed_kv(x, params, state, site.shape[0], bits=self.quant_bits,
                                     group=self.group)
        y = bibranch_attention(q, [(k, v, (lag >= 0) & (lag < self.window)),
                                   (k_hat, v_hat, lag >= self.window)], q_positions)
        return y.astype(q.dtype), state, metrics

    # ------------------------------------------------------------------ the cache
    def _padded_length(self, length: int) -> int:
        """Compressed-branch positions: ``length`` rounded up to whole groups plus two
        groups of slack, so that a write of whole groups from the open group's start
        (at most ``ceil(T / group) + 1`` groups) never runs past the end."""
        if not self.quant_bits:
            return length
        return (-(-length // self.group) + 2) * self.group

    def init_cache(self, site: Site, batch: int, length: int, dtype: Any
                   ) -> dict[str, jax.Array]:
        heads, dim = site.shape
        r_k, r_v = self.ranks(site)
        cache = {"k_recent": jnp.zeros((batch, self.window, heads, dim), dtype),
                 "v_recent": jnp.zeros((batch, self.window, heads, dim), dtype)}
        if not self.quant_bits:
            return {**cache, "c_k": jnp.zeros((batch, length, r_k), dtype),
                    "c_v": jnp.zeros((batch, length, r_v), dtype)}
        n = self._padded_length(length)
        per_byte = 8 // self.quant_bits
        width = lambda r: -(-r // per_byte)  # noqa: E731
        return {**cache,
                "k_group": jnp.zeros((batch, self.group, r_k), jnp.float32),
                "k_codes": jnp.zeros((batch, n, width(r_k)), jnp.uint8),
                "k_scale": jnp.zeros((batch, n // self.group, r_k), SCALE_DTYPE),
                "k_zero": jnp.zeros((batch, n // self.group, r_k), SCALE_DTYPE),
                "v_codes": jnp.zeros((batch, n, width(r_v)), jnp.uint8),
                "v_scale": jnp.zeros((batch, n, 1), SCALE_DTYPE),
                "v_zero": jnp.zeros((batch, n, 1), SCALE_DTYPE)}

    def _pack(self, codes: jax.Array) -> jax.Array:
        return pack_codes(codes, self.quant_bits)

    def _unpack(self, packed: jax.Array, width: int) -> jax.Array:
        return unpack_codes(packed, self.quant_bits, width)

    def _write_compressed(self, cache: dict, c_k: jax.Array, c_v: jax.Array, pos: jax.Array
                          ) -> dict:
        """Write the new tokens' compressed keys and values (``(B, T, r)``) at ``pos``."""
        if not self.quant_bits:
            return {**cache,
                    "c_k": jax.lax.dynamic_update_slice(cache["c_k"],
                                                        c_k.astype(cache["c_k"].dtype),
                                                        (0, pos, 0)),
                    "c_v": jax.lax.dynamic_update_slice(cache["c_v"],
                                                        c_v.astype(cache["c_v"].dtype),
                                                        (0, pos, 0))}
        g, t = self.group, c_k.shape[1]
        codes, scale, zero = quantize_per_token(c_v, self.quant_bits)
        cache = {**cache,
                 "v_codes": jax.lax.dynamic_update_slice(cache["v_codes"], self._pack(codes),
                                                         (0, pos, 0)),
                 "v_scale": jax.lax.dynamic_update_slice(
                     cache["v_scale"], scale.astype(SCALE_DTYPE), (0, pos, 0)),
                 "v_zero": jax.lax.dynamic_update_slice(
                     cache["v_zero"], zero.astype(SCALE_DTYPE), (0, pos, 0))}
        # keys: the open group's raw values, then the new tokens, as whole groups from
        # the open group's start; incomplete groups are rewritten once they complete
        base = (pos // g) * g
        span = jnp.concatenate([cache["k_group"], jnp.zeros_like(c_k)], axis=1)
        span = jax.lax.dynamic_update_slice(span, c_k.astype(jnp.float32), (0, pos - base, 0))
        span = jnp.pad(span, ((0, 0), (0, -span.shape[1] % g), (0, 0)))
        codes, scale, zero = quantize_per_channel_groups(span, self.quant_bits, g)
        end = pos + t
        open_start = (end // g) * g - base
        return {**cache,
                "k_codes": jax.lax.dynamic_update_slice(cache["k_codes"], self._pack(codes),
                                                        (0, base, 0)),
                "k_scale": jax.lax.dynamic_update_slice(
                    cache["k_scale"], scale.astype(SCALE_DTYPE), (0, base // g, 0)),
                "k_zero": jax.lax.dynamic_update_slice(
                    cache["k_zero"], zero.astype(SCALE_DTYPE), (0, base // g, 0)),
                "k_group": jax.lax.dynamic_slice_in_dim(span, open_start, g, axis=1)}

    def _read_compressed(self, cache: dict, params: State, state: State, heads: int
                         ) -> tuple[jax.Array, jax.Array]:
        """Every compressed position's reconstructed keys and values ``(B, n, H, D)``."""
        if not self.quant_bits:
            c_k, c_v = cache["c_k"].astype(jnp.float32), cache["c_v"].astype(jnp.float32)
        else:
            r_k, r_v = params["a_k"].shape[1], params["a_v"].shape[1]
            g = self.group
            c_k = (self._unpack(cache["k_codes"], r_k)
                   * jnp.repeat(cache["k_scale"].astype(jnp.float32), g, axis=1)
                   + jnp.repeat(cache["k_zero"].astype(jnp.float32), g, axis=1))
            c_v = (self._unpack(cache["v_codes"], r_v) * cache["v_scale"].astype(jnp.float32)
                   + cache["v_zero"].astype(jnp.float32))
        k = c_k @ params["b_k"] + state["bias_k"]
        v = c_v @ params["b_v"] + state["bias_v"]
        return (t.reshape(*t.shape[:2], heads, -1) for t in (k, v))

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array,
                      cache: dict[str, jax.Array], pos: jax.Array, params: State,
                      state: State, site: Site, ctx: Context
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        w, t = self.window, q.shape[1]
        positions = pos + jnp.arange(t)
        x = x.astype(jnp.float32)
        cache = self._write_compressed(cache, x @ params["a_k"], x @ params["a_v"], pos)
        # the exact branch: the ring (positions before this chunk) and the chunk itself
        slots = jnp.arange(w)
        ring_pos = pos - 1 - jnp.mod(pos - 1 - slots, w)
        ring_lag = positions[:, None] - ring_pos[None, :]
        chunk_lag = positions[:, None] - positions[None, :]
        k_hat, v_hat = self._read_compressed(cache, params, state, site.shape[0])
        old_lag = positions[:, None] - jnp.arange(k_hat.shape[1])[None, :]
        y = bibranch_attention(q, [
            (cache["k_recent"], cache["v_recent"],
             (ring_pos[None, :] >= 0) & (ring_lag < w)),
            (k, v, (chunk_lag >= 0) & (chunk_lag < w)),
            (k_hat, v_hat, old_lag >= w)], positions)
        # the ring keeps the chunk's last tokens, each at slot position mod window
        keep = min(t, w)
        new_pos = positions[t - keep:]
        slots_new = jnp.mod(new_pos, w)
        ring_k = cache["k_recent"].at[:, slots_new].set(
            k[:, t - keep:].astype(cache["k_recent"].dtype))
        ring_v = cache["v_recent"].at[:, slots_new].set(
            v[:, t - keep:].astype(cache["v_recent"].dtype))
        return y.astype(q.dtype), {**cache, "k_recent": ring_k, "v_recent": ring_v}

    # ------------------------------------------------------------------ calibration
    def calibrate(self, site: Site, view: View, data: AttentionData) -> View:
        """ASVD initialisation from ``data.x_abs_mean`` ``(C,)`` (mean ``|x|`` per
        channel of the module input over the calibration tokens) and
        ``data.kv_projection`` ``(W_k, b_k, W_v, b_v)``; the biases become state."""
        w_k, b_k, w_v, b_v = data.kv_projection
        r_k, r_v = self.ranks(site)
        a_k, bk = asvd_factors(w_k, data.x_abs_mean, r_k, self.alpha)
        a_v, bv = asvd_factors(w_v, data.x_abs_mean, r_v, self.alpha)
        params = {**view.params, "a_k": a_k, "b_k": bk, "a_v": a_v, "b_v": bv}
        state = {**view.state, "bias_k": jnp.asarray(b_k, jnp.float32),
                 "bias_v": jnp.asarray(b_v, jnp.float32),
                 "calibrated": jnp.ones((), jnp.int32)}
        return View(view.x, params, state)


def cache_bytes_per_old_token(cache: dict[str, jax.Array], length: int) -> float:
    """Bytes per token of the compressed branch, from the cache arrays themselves: the
    compressed keys, values and their scales, over ``length`` positions."""
    names = [n for n in cache if n.startswith(("c_", "k_codes", "k_scale", "k_zero",
                                                "v_codes", "v_scale", "v_zero"))]
    return sum(cache[n].size * cache[n].dtype.itemsize for n in names) / length / (
        cache[names[0]].shape[0])
