"""Analog in-memory computing in JAX: training-time noise and the PCM inference model.

Pure functions (no modules) over arrays and explicit keys; ``docs/methods.md``
section 5 has the formulas and their sources.

Training-time noise (hardware-aware training, aihwkit's weight modifiers; activation noise
of Duque et al. 2024, arXiv 2409.08633) is drawn once per call from the key it is given;
all of it is a *simulation* in floating point.

Units. Weights and activations are in the model's own scale. The analog matrix-vector
product of :func:`analog_matmul` works, like aihwkit's tiles with noise management, in
*normalised units*: each input vector divided by its max |x| and the weight by its max |W|,
so inputs lie in [-1, 1] and weights in [-1, 1]; DAC/ADC levels, output noise and the ADC
bound are in those units. The PCM model works in microsiemens (uS) and seconds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.dtypes import upcast
from sparsejax.estimators import straight_through

__all__ = ["AIHWKIT_TIMES", "NOISE_KINDS", "PCMNoiseModel", "ProgrammedWeights",
           "adc", "analog_matmul", "activation_noise", "clip_weights_gaussian", "dac",
           "drift_compensation", "output_noise", "read_noise_mvm", "weight_noise"]

NOISE_KINDS = ("add", "mult")


# --------------------------------------------------------------------------- training noise


def weight_noise(w: jax.Array, key: jax.Array, std: float, kind: str = "add") -> jax.Array:
    """Noisy copy of ``w`` for one mini-batch (aihwkit weight modifiers, docs/methods.md §5).

    ``add``: ``w + std * max|W| * xi``; ``mult``: ``w * (1 + std * xi)``, ``xi ~ N(0, 1)``
    per weight. As in aihwkit the noisy weight is used in the forward and the backward
    (dX), and the update goes to the clean weight: the gradient with respect to ``w`` is
    the gradient with respect to the noisy weight (straight-through). Shape and dtype of
    ``w``.
    """
    if std == 0:
        return w
    w32 = upcast(w)
    xi = jax.random.normal(key, w.shape, w32.dtype)
    if kind == "add":
        noisy = w32 + std * jnp.max(jnp.abs(w32)) * xi
    elif kind == "mult":
        noisy = w32 * (1.0 + std * xi)
    else:
        raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    return straight_through(w, noisy.astype(w.dtype))


def activation_noise(a: jax.Array, key: jax.Array, std: float, correlated: bool = False,
                     kind: str = "add") -> jax.Array:
    """Noise on an activation layer's output ``a`` of shape ``(..., features)`` (Duque et
    al. 2024): ``add``: ``a + std * xi``; ``mult``: ``a * (1 + std * xi)``. Uncorrelated:
    one ``xi`` per element; correlated: one per input vector, shared across the features
    (shape ``(..., 1)``). Gradients follow the formula (``mult`` scales them by
    ``1 + std * xi``)."""
    if std == 0:
        return a
    shape = (*a.shape[:-1], 1) if correlated else a.shape
    a32 = upcast(a)
    xi = jax.random.normal(key, shape, a32.dtype)
    if kind == "add":
        return (a32 + std * xi).astype(a.dtype)
    if kind == "mult":
        return (a32 * (1.0 + std * xi)).astype(a.dtype)
    raise ValueError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")


def output_noise(y: jax.Array, key: jax.Array, std: float) -> jax.Array:
    """``y + std * xi`` per output (aihwkit ``out_noise``; ``y`` in normalised units)."""
    if std == 0:
        return y
    y32 = upcast(y)
    return (y32 + std * jax.random.normal(key, y.shape, y32.dtype)).astype(y.dtype)


def read_noise_mvm(x: jax.Array, w: jax.Array, key: jax.Array, w_noise: float) -> jax.Array:
    """PCM-read-style MVM noise to add to ``x @ w`` (docs/methods.md §5):
    ``w_noise * sqrt(sum_j |w_ij| x_j^2) * xi``. ``x``: ``(..., in)``, ``w``: ``(in, out)``
    (normalised units) -> ``(..., out)``."""
    spread = jnp.sqrt(upcast(jnp.matmul(jnp.square(x), jnp.abs(w))))
    noise = w_noise * spread * jax.random.normal(key, spread.shape, spread.dtype)
    return jax.lax.stop_gradient(noise).astype(x.dtype)


def clip_weights_gaussian(w: jax.Array, alpha: float = 2.5) -> jax.Array:
    """``clip(w, -alpha * std(W), alpha * std(W))`` (aihwkit's layer-Gaussian clip); the
    bound carries no gradient, clipped weights get none."""
    bound = jax.lax.stop_gradient(alpha * jnp.std(upcast(w))).astype(w.dtype)
    return jnp.clip(w, -bound, bound)


def _levels(bits: int) -> int:
    if isinstance(bits, bool) or bits != int(bits) or not 2 <= bits <= 24:
        raise ValueError(f"bits={bits!r}: converter resolution must be an integer in [2, 24]")
    return 2 ** bits - 2  # aihwkit: 8 bits -> 254 steps across the full range


def dac(x: jax.Array, bits: int) -> jax.Array:
    """Input DAC: ``x`` in normalised units, clipped to [-1, 1] and rounded to ``2^bits -
    2`` steps across the range; straight-through gradient inside the range."""
    step = 2.0 / _levels(bits)
    clipped = jnp.clip(x, -1.0, 1.0)
    return straight_through(clipped, jnp.round(clipped / step) * step)


def adc(y: jax.Array, bits: int, bound: float) -> jax.Array:
    """Output ADC: ``y`` (normalised units) clipped to ``+-bound`` and rounded to ``2^bits
    - 2`` steps across ``[-bound, bound]``; straight-through gradient inside the range."""
    if not bound > 0 or not math.isfinite(bound):  # also rejects NaN
        raise ValueError(f"bound={bound!r}: the ADC range must be a finite number > 0")
    step = 2.0 * bound / _levels(bits)
    clipped = jnp.clip(y, -bound, bound)
    return straight_through(clipped, jnp.round(clipped / step) * step)


def analog_matmul(x: jax.Array, w: jax.Array, spec: Any, key: jax.Array | None
                  ) -> jax.Array:
    """``x @ w`` as an analog tile computes it: ``x`` ``(..., in)``, ``w`` ``(in, out)``.

    Each input vector is scaled by its max |x| and the weight by max|W| (noise management;
    the scales carry no gradient), the DAC quantises the input, the product gets read
    noise and output noise (when ``key`` is given), the ADC clips and quantises, and the
    result is scaled back. Without converters or noise this is ``x @ w`` up to rounding.
    ``spec``: the tile's settings (``dac_bits``, ``adc_bits``, ``adc_bound``,
    ``read_noise``, ``out_noise``; ``sparsejax.transforms.analog.AnalogSpec``).
    """
    x_scale = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(x), -1, keepdims=True),
                                                jnp.finfo(x.dtype).tiny))
    w_scale = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(w.dtype).tiny))
    xn, wn = x / x_scale, w / w_scale
    if spec.dac_bits:
        xn = dac(xn, spec.dac_bits)
    yn = jnp.matmul(xn, wn)
    if key is not None and spec.read_noise:
        yn = yn + read_noise_mvm(xn, wn, jax.random.fold_in(key, 0), spec.read_noise)
    if key is not None and spec.out_noise:
        yn = output_noise(yn, jax.random.fold_in(key, 1), spec.out_noise)
    if spec.adc_bits:
        yn = adc(yn, spec.adc_bits, spec.adc_bound)
    return yn * x_scale * w_scale.astype(yn.dtype)


# --------------------------------------------------------------------------- PCM inference


class ProgrammedWeights(NamedTuple):
    """A weight matrix programmed onto PCM conductance pairs (a pytree).

    ``g_plus`` / ``g_minus``: programmed conductances in uS (shape of the weight);
    ``nu_plus`` / ``nu_minus``: their drift exponents; ``scale``: max|W| of the weight that
    was programmed (``w = (g+ - g-) * scale / g_max``).
    """

    g_plus: jax.Array
    g_minus: jax.Array
    nu_plus: jax.Array
    nu_minus: jax.Array
    scale: jax.Array


@dataclasses.dataclass(frozen=True)
class PCMNoiseModel:
    """aihwkit's ``PCMLikeNoiseModel`` (Nandakumar et al. 2019) with the single-pair
    conductance converter; defaults are aihwkit's (docs/methods.md §5).

    Attributes:
      g_max: conductance of the largest |weight|, uS.
      t0: time of the first read after programming, s (drift reference).
      t_read: read pulse duration of the 1/f noise fit, s.
      prog_coeff: programming-noise polynomial ``sigma = c0 + c1 r + c2 r^2`` (uS) in
        ``r = g_T / g_max``, fitted at ``prog_coeff_g_max_reference`` uS.
      prog_noise_scale, read_noise_scale, drift_scale: multipliers (1 = the fit).
    """

    g_max: float = 25.0
    t0: float = 20.0
    t_read: float = 250e-9
    prog_coeff: tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    prog_coeff_g_max_reference: float = 25.0
    prog_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0

    def programming_noise_std(self, g_target: jax.Array) -> jax.Array:
        """Std (uS) of the programming noise at target conductance ``g_target`` (uS)."""
        r = g_target / self.g_max
        sigma = sum(c * r ** i for i, c in enumerate(self.prog_coeff))
        return sigma * (self.g_max / self.prog_coeff_g_max_reference)

    def drift_exponent_stats(self, g_target: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mu_nu, sigma_nu)`` of the Gaussian whose absolute value is the drift exponent,
        at target conductance ``g_target`` (uS)."""
        log_r = jnp.log(jnp.maximum(jnp.abs(g_target) / self.g_max, 1e-7))
        mu = jnp.clip(-0.0155 * log_r + 0.0244, 0.049, 0.1)
        sigma = jnp.clip(-0.0125 * log_r - 0.0059, 0.008, 0.045)
        return mu, sigma

    def read_noise_std(self, g_prog: jax.Array, t: float | jax.Array) -> jax.Array:
        """Relative std of the accumulated 1/f read noise at ``t`` seconds after
        programming: ``Q_s sqrt(ln((t + t0 + t_read) / (2 t_read)))``."""
        q_s = jnp.minimum(0.0088 / jnp.maximum((jnp.abs(g_prog) / self.g_max) ** 0.65, 1e-3),
                          0.2)
        return q_s * jnp.sqrt(jnp.log((t + self.t0 + self.t_read) / (2 * self.t_read)))

    def to_conductances(self, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Single-pair mapping: ``(g+, g-, max|W|)`` with ``g+- = max(+-w, 0) / max|W| *
        g_max`` (uS)."""
        w = upcast(w)
        scale = jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(w.dtype).tiny)
        return (jnp.maximum(w, 0) / scale * self.g_max, jnp.maximum(-w, 0) / scale * self.g_max,
                scale)

    def program_conductance(self, g_target: jax.Array, key: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
        """``(g_prog, nu)`` for target conductances ``g_target`` (uS): programming noise
        ``max(g_T + sigma_prog xi, 0)`` and drift exponents ``|N(mu_nu, sigma_nu)|``, both
        from the target (as aihwkit)."""
        k_prog, k_nu = jax.random.split(key)
        xi = jax.random.normal(k_prog, g_target.shape, g_target.dtype)
        sigma = self.prog_noise_scale * self.programming_noise_std(g_target)
        g_prog = jnp.maximum(g_target + sigma * xi, 0.0)
        mu, sig = self.drift_exponent_stats(g_target)
        nu = jnp.abs(mu + sig * jax.random.normal(k_nu, g_target.shape, g_target.dtype))
        nu = nu * self.drift_scale
        return g_prog, nu

    def read_conductance(self, g_prog: jax.Array, nu: jax.Array, t: float | jax.Array,
                         key: jax.Array) -> jax.Array:
        """Conductance (uS) read ``t`` seconds after programming: drift ``g_prog ((t + t0) /
        t0)^-nu``, plus 1/f read noise ``|g_drift| sigma_n xi``, clipped at 0."""
        g_drift = g_prog * ((t + self.t0) / self.t0) ** (-nu)
        sigma = self.read_noise_scale * self.read_noise_std(g_prog, t)
        g = g_drift + jnp.abs(g_drift) * sigma * jax.random.normal(key, g_prog.shape, g_prog.dtype)
        return jnp.maximum(g, 0.0)

    def program(self, w: jax.Array, key: jax.Array) -> ProgrammedWeights:
        """Program ``w`` (any shape) onto conductance pairs; both devices of each pair get
        programming noise (the idle one targets 0 uS)."""
        g_plus, g_minus, scale = self.to_conductances(w)
        k_plus, k_minus = jax.random.split(key)
        gp, nup = self.program_conductance(g_plus, k_plus)
        gm, num = self.program_conductance(g_minus, k_minus)
        return ProgrammedWeights(gp, gm, nup, num, scale)

    def weights_at_programming(self, programmed: ProgrammedWeights) -> jax.Array:
        """The programmed weights before drift and read noise (original scale)."""
        return (programmed.g_plus - programmed.g_minus) * programmed.scale / self.g_max

    def read(self, programmed: ProgrammedWeights, t_seconds: float | jax.Array,
             key: jax.Array) -> jax.Array:
        """Weights in the original scale read ``t_seconds`` after programming."""
        k_plus, k_minus = jax.random.split(key)
        g_plus = self.read_conductance(programmed.g_plus, programmed.nu_plus, t_seconds, k_plus)
        g_minus = self.read_conductance(programmed.g_minus, programmed.nu_minus, t_seconds,
                                        k_minus)
        return (g_plus - g_minus) * programmed.scale / self.g_max


def drift_compensation(w_reference: jax.Array, w_t: jax.Array,
                       probe: jax.Array | None = None) -> jax.Array:
    """Global drift compensation factor ``alpha = mean|probe @ W_ref| / mean|probe @ W_t|``
    (aihwkit ``GlobalDriftCompensation``): the layer's outputs at time t are multiplied by
    ``alpha``. ``w_reference``: the weights read right after programming; ``probe``:
    ``(k, in)`` inputs, default the identity (aihwkit's probe), i.e. ``mean|W_ref| /
    mean|W_t|``. Returns a scalar."""
    if probe is None:
        ref, now = jnp.abs(w_reference), jnp.abs(w_t)
    else:
        ref, now = jnp.abs(probe @ w_reference), jnp.abs(probe @ w_t)
    return jnp.mean(ref) / jnp.maximum(jnp.mean(now), 1e-30)


# Seconds of aihwkit's tutorial evaluation grid: 1 minute, 1 hour, 1 day, 30 days, 1 year.
AIHWKIT_TIMES = (60.0, 3600.0, 86400.0, 2592000.0, 31536000.0)
