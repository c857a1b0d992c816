"""The analog tile (docs/methods.md §5): weight clipping and per-call weight noise,
DAC/ADC converters, read and output noise on a ``Linear``; activation noise on an
``Activation`` (hardware-aware training as in IBM aihwkit; Duque et al. 2024).
Everything here is simulation in floating point."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.analog import (
    NOISE_KINDS,
    activation_noise,
    analog_matmul,
    clip_weights_gaussian,
    weight_noise,
)
from sparsejax.transforms.base import (
    Context,
    CustomMatmul,
    Metrics,
    NoiseCounter,
    Site,
    SpecError,
    State,
    Transform,
    register,
)

__all__ = ["NOISE_KINDS", "AnalogSpec"]


@register("analog", "tile")
@dataclass(frozen=True, kw_only=True)
class AnalogSpec(CustomMatmul, NoiseCounter, Transform):
    """What an analog layer simulates (all off by default).

    Linear layers use the weight, output, read and converter fields; activation layers use
    the ``act_*`` fields. Noise (weight, activation, output, read) is drawn only in
    training calls unless ``noise_in_eval``, from the layer's key and a checkpointed call
    counter; clipping and DAC/ADC quantisation are properties of the hardware and apply in
    evaluation too.

    Attributes:
      weight_noise: std of the per-call weight noise; ``add``: relative to max|W|
        (aihwkit ADD_NORMAL), ``mult``: relative to each weight. 0.06 is aihwkit's
        tutorial setting.
      weight_noise_kind: ``add`` or ``mult``.
      clip_alpha: clip weights to ``+-alpha * std(W)`` in the forward (aihwkit's
        LAYER_GAUSS clip, alpha 2.5); 0 disables.
      act_noise: std of the noise on an activation layer's output (``add``: absolute,
        ``mult``: relative).
      act_noise_kind: ``add`` or ``mult``.
      act_noise_correlated: one draw per input vector shared across the layer's features
        (a supply swing) instead of one per neuron.
      out_noise: std of Gaussian noise on each output, normalised units (aihwkit 0.04-0.06).
      read_noise: PCM-read-style MVM noise ``w_noise`` (aihwkit's 0.0175); 0 disables.
      dac_bits, adc_bits: input / output converter resolution (``2^bits - 2`` levels, 254
        for 8 bits as aihwkit's HWA preset); 0 disables.
      adc_bound: the ADC's output range ``+-adc_bound`` in normalised units.
      noise_in_eval: keep the noise on in evaluation (noise-robustness tests).
    """

    weight_noise: float = 0.0
    weight_noise_kind: str = "add"
    clip_alpha: float = 0.0
    act_noise: float = 0.0
    act_noise_kind: str = "add"
    act_noise_correlated: bool = False
    out_noise: float = 0.0
    read_noise: float = 0.0
    dac_bits: int = 0
    adc_bits: int = 0
    adc_bound: float = 10.0
    noise_in_eval: bool = False

    roles = ("weights", "outputs")

    def needed_roles(self) -> tuple[tuple[str, str], ...]:
        """Activation noise acts on an activation layer's outputs."""
        return (("outputs", "act_noise"),) if self.act_noise > 0 else ()

    def check(self) -> None:
        for name in ("weight_noise", "clip_alpha", "act_noise", "out_noise", "read_noise"):
            if getattr(self, name) < 0:
                raise SpecError(name, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_noise_kind", "act_noise_kind"):
            if getattr(self, name) not in NOISE_KINDS:
                raise SpecError(name, f"{name} must be one of {NOISE_KINDS}, "
                                f"got {getattr(self, name)!r}")
        for name in ("dac_bits", "adc_bits"):
            bits = getattr(self, name)
            if bits != 0 and not 2 <= bits <= 24:
                raise SpecError(name, f"{name} must be 0 (off) or in [2, 24], got {bits}")
        if self.adc_bound <= 0:
            raise SpecError("adc_bound", f"adc_bound must be > 0, got {self.adc_bound}")

    @property
    def uses_normalised_mvm(self) -> bool:
        """Whether the layer's matmul goes through :func:`~sparsejax.analog.analog_matmul`."""
        return bool(self.dac_bits or self.adc_bits or self.out_noise or self.read_noise)

    def _draws(self, site: Site) -> bool:
        if site.role == "outputs":
            return bool(self.act_noise)
        return bool(self.weight_noise or self.out_noise or self.read_noise)

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {"count": jnp.zeros((), jnp.uint32)} if self._draws(site) else {}

    def _next_key(self, state: State, ctx: Context) -> tuple[jax.Array | None, State]:
        """``fold_in(layer key, count)`` and the advanced counter, when noise is on."""
        if "count" not in state or not (ctx.training or self.noise_in_eval):
            return None, state
        return (jax.random.fold_in(ctx.key, state["count"]),
                {**state, "count": state["count"] + 1})

    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        """Weights: the clip (the programmed weight); outputs: activation noise."""
        if site.role == "weights":
            return (clip_weights_gaussian(x, self.clip_alpha) if self.clip_alpha else x,
                    state, {})
        key, state = self._next_key(state, ctx)
        if key is None:
            return x, state, {}
        return (activation_noise(x, key, self.act_noise, self.act_noise_correlated,
                                 self.act_noise_kind), state, {})

    def with_draw_count(self, state: State, count: jax.Array) -> State:
        return {**state, "count": jnp.asarray(count, jnp.uint32)} if "count" in state else state

    @property
    def exclusive_matmul(self) -> str | None:
        return "method"

    def matmul(self, x: jax.Array, w: jax.Array, state: State, ctx: Context
               ) -> tuple[jax.Array, State]:
        """The tile's product: per-call weight noise, then the normalised MVM with
        converters and read / output noise (or a plain product when they are off)."""
        key, state = self._next_key(state, ctx)
        if key is not None:
            w = weight_noise(w, jax.random.fold_in(key, 2), self.weight_noise,
                             self.weight_noise_kind)
        w = w.astype(x.dtype)
        if self.uses_normalised_mvm:
            return analog_matmul(x, w, self, key), state
        return jnp.matmul(x, w), state
