"""Basic layers: :class:`Linear`, :class:`Activation`, :class:`Embed`, :class:`LayerNorm`
and functional dropout.

Parameters are stored in float32; ``dtype`` is the compute dtype (float32 or bfloat16):
operands are cast to it before the matmul and the result is returned in it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.analog import (
    AnalogSpec,
    activation_noise,
    analog_matmul,
    clip_weights_gaussian,
    weight_noise,
)
from sparsejax.kernels.nm_matmul import PackedNM, nm_matmul, pack_nm
from sparsejax.quant import (
    STAT_NAMES,
    QuantSpec,
    lsq,
    lsq_init_step,
    lsq_range,
    quantize_with_stats,
)
from sparsejax.sparse_linear import nm_linear
from sparsejax.sparsity import (
    NMSpec,
    argmax_nm_mask,
    check_nm,
    effective_weight,
    gumbel_nm_mask,
    init_mask_logits,
    linear_schedule,
    mask_entropy,
    sste_scale,
)

__all__ = ["ACTIVATIONS", "BATCH_AXES", "MASK_STAT_NAMES", "Activation", "AnalogState",
           "AnalogWeights",
           "Embed", "LSQQuantizer", "LayerNorm", "Linear", "MaskLogits", "PackedState",
           "QuantState", "SparsityState", "dropout", "pack_model", "shard_batch"]

# What a MaskLLM layer records about its last training call (``Linear.mask_stats``): the
# regulariser term it adds to the loss (``-lambda * sum (W * M)^2``, carrying its gradient
# to the mask logits inside the training trace; W is held constant in it), the mean
# candidate entropy, the mean |soft - hard| mask gap, and the scheduled tau and kappa.
MASK_STAT_NAMES = ("regularizer", "entropy", "soft_hard_gap", "tau", "kappa")


class SparsityState(nnx.Variable):
    """Non-trainable state of a sparse layer (S-STE's frozen beta, the MVUE draw counter):
    saved in checkpoints with the rest of the model, never touched by the optimiser."""


class MaskLogits(nnx.Param):
    """MaskLLM's per-group candidate logits: trained (a ``Param``), but a collection of
    their own, so the optimiser can give them their own learning rate, leave them out of
    weight decay, or train them alone (``freeze_weights``)."""


class AnalogState(nnx.Variable):
    """The call counter that keys an analog layer's noise draws (checkpointed, so a resumed
    run draws the same noise as an uninterrupted one)."""


class AnalogWeights(nnx.Variable):
    """Weights read from simulated PCM devices (``sparsejax.analog.PCMNoiseModel.read``,
    drift compensation folded in) that an inference-time layer uses instead of its own.
    Set by ``sparsejax.nn.analog`` for analog evaluation; never trained."""


def _next_noise_key(count: AnalogState, seed: int) -> jax.Array:
    """A fresh key per call: ``fold_in(key(seed), count)``; advances the counter."""
    step = count[...]
    count[...] = step + 1
    return jax.random.fold_in(jax.random.key(seed), step)


class PackedState(nnx.Variable):
    """The metadata (kept positions) of a packed N:M weight: saved in checkpoints, never
    trained."""


class QuantState(nnx.Variable):
    """Non-trainable state of a quantised layer: the diagnostics of the activations it
    quantised in its last call (``STAT_NAMES`` order), read by the trainer's metrics."""


# E|x| of a unit-variance Gaussian: LSQ's activation step is initialised for the inputs of
# our linear layers (LayerNorm outputs, GELU of them) instead of from a first batch.
UNIT_GAUSSIAN_ABS_MEAN = math.sqrt(2.0 / math.pi)


class LSQQuantizer(nnx.Module):
    """LSQ with a learned per-tensor step (Esser et al. 2020; docs/methods.md §4).

    The step is an ``nnx.Param`` (trained with the weights, no weight decay: it is a
    scalar), initialised to ``2 E|x| / sqrt(Q_p)``; its gradient is scaled by
    ``1 / sqrt(count * Q_p)`` where ``count`` is the number of weights, or the number of
    features of an activation vector.
    """

    def __init__(self, bits: float, init_step: float, count: int):
        self.bits = bits
        self.grad_scale = 1.0 / math.sqrt(count * lsq_range(bits)[1])
        self.step = nnx.Param(jnp.asarray(init_step, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return lsq(x, self.step[...], self.bits, grad_scale=self.grad_scale)

Initializer = nnx.initializers.Initializer
DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
DEFAULT_EMBED_INIT = nnx.initializers.normal(0.02)


def _quantize(x: jax.Array, spec: QuantSpec, learned: LSQQuantizer | None, axis: int):
    if learned is None:
        return quantize_with_stats(x, spec, axis=axis)
    return quantize_with_stats(x, spec, axis=axis, step=learned.step[...],
                               grad_scale=learned.grad_scale)


class Linear(nnx.Module):
    """``y = x @ W + b`` with ``W`` of shape ``(in_features, out_features)``.

    Axis 0 of ``W`` is the contracting axis: N:M groups and quantisation blocks run along
    it (see ``docs/methods.md``, conventions). A layer is dense and full
    precision until path rules (``sparsejax.nn.apply_rules``) configure it:

    * :meth:`set_sparsity` gives it an :class:`~sparsejax.sparsity.NMSpec`; it then
      multiplies by the method's effective weight through
      :func:`~sparsejax.sparse_linear.nm_linear` (MaskLLM: by ``W * M`` with a
      Gumbel-softmax mask ``M`` in training, the argmax N:M mask in evaluation);
    * :meth:`set_quant` quantises its weights and/or its input activations
      (:class:`~sparsejax.quant.QuantSpec`, blocks along ``in``). With both, the weight is
      pruned first, then quantised.

    Args:
      in_features, out_features: sizes of the last axis of ``x`` and of ``y``.
      use_bias: add a learned bias.
      kernel_init: initialiser of ``W``.
      dtype: compute dtype; ``None`` keeps the input's dtype.
      rngs: the ``nnx.Rngs`` that draws the initial weights.

    ``deterministic`` (set by ``model.eval()`` / ``model.train()``) switches stochastic
    training transforms (MaskLLM's sampled masks) to their inference form.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT,
                 dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.sparsity: NMSpec | None = None
        self.beta: SparsityState | None = nnx.data(None)
        self.mvue_count: SparsityState | None = nnx.data(None)
        self.mvue_seed = 0
        self.weight_quant: QuantSpec | None = None
        self.act_quant: QuantSpec | None = None
        self.weight_lsq: LSQQuantizer | None = nnx.data(None)
        self.act_lsq: LSQQuantizer | None = nnx.data(None)
        self.act_stats: QuantState | None = nnx.data(None)
        self.mask_logits: MaskLogits | None = nnx.data(None)
        self.mask_step: SparsityState | None = nnx.data(None)
        self.mask_stats: SparsityState | None = nnx.data(None)
        self.schedule_steps = 0
        self.analog: AnalogSpec | None = None
        self.analog_count: AnalogState | None = nnx.data(None)
        self.analog_seed = 0
        self.analog_weights: AnalogWeights | None = nnx.data(None)
        self.deterministic = False

    def set_sparsity(self, spec: NMSpec, seed: int = 0, total_steps: int | None = None
                     ) -> None:
        """Make this layer N:M sparse. S-STE's beta is fitted to the *current* kernel and
        frozen (docs/methods.md §1); ``seed`` keys this layer's MVUE draws and MaskLLM's
        logit initialisation and Gumbel draws. MaskLLM's schedules run over
        ``spec.schedule_steps`` training calls, or ``total_steps`` when that is 0; its
        logits start from the *current* kernel's magnitude mask (``spec.prior``)."""
        check_nm(self.kernel.shape, spec.n, spec.m, axis=0)
        self.sparsity = spec
        self.beta = (SparsityState(sste_scale(self.kernel[...], spec.n, spec.m, 0))
                     if spec.method == "sste" else None)
        self.mvue_count = SparsityState(jnp.zeros((), jnp.uint32)) if spec.mvue else None
        self.mvue_seed = seed
        self.mask_logits = self.mask_step = self.mask_stats = None
        if spec.method == "maskllm":
            self.schedule_steps = spec.schedule_steps or total_steps or 0
            if self.schedule_steps <= 0:
                raise ValueError("maskllm needs schedule_steps > 0 (or the run's train.steps)")
            self.mask_logits = MaskLogits(init_mask_logits(
                jax.random.key(seed), self.kernel[...], spec.n, spec.m, 0,
                std=spec.logit_std, prior=spec.prior, prior_strength=spec.prior_strength))
            self.mask_step = SparsityState(jnp.zeros((), jnp.uint32))
            self.mask_stats = SparsityState(jnp.zeros((len(MASK_STAT_NAMES),), jnp.float32))

    def set_quant(self, weights: QuantSpec | None = None,
                  activations: QuantSpec | None = None) -> None:
        """Quantise this layer's weights and/or input activations (simulated,
        docs/methods.md §3-4). Call after :meth:`set_sparsity`: LSQ's weight step is
        initialised from the current kernel. Raises ``ValueError`` for an affine DAT on a
        sparse layer (its offset would fill the pruned zeros; the paper uses the linear form
        with sparsity)."""
        if (weights is not None and not weights.keeps_zeros and self.sparsity is not None
                and self.sparsity.method != "dense"):
            raise ValueError("affine DAT does not keep pruned weights at zero; use "
                             "affine: false for weights of a sparse layer (docs/methods.md §3)")
        self.weight_quant, self.act_quant = weights, activations
        self.weight_lsq = self.act_lsq = None
        if weights is not None and weights.method == "lsq":
            abs_mean = float(jnp.mean(jnp.abs(self.kernel[...])))
            self.weight_lsq = LSQQuantizer(weights.bits, lsq_init_step(abs_mean, weights.bits),
                                           count=self.kernel.size)
        if activations is not None and activations.method == "lsq":
            self.act_lsq = LSQQuantizer(
                activations.bits, lsq_init_step(UNIT_GAUSSIAN_ABS_MEAN, activations.bits),
                count=self.in_features)
        self.act_stats = (QuantState(jnp.zeros((len(STAT_NAMES),), jnp.float32))
                          if activations is not None else None)

    def set_analog(self, spec: AnalogSpec, seed: int = 0) -> None:
        """Simulate this layer on an analog tile (``sparsejax.analog``, docs/methods.md §5):
        weight clipping and noise, DAC/ADC, output and read noise per ``spec``. Noise keys
        come from ``seed`` and a checkpointed call counter. Raises ``ValueError`` with an
        N:M method whose own matmul path cannot take the analog product (MVUE, FP8
        simulation, the packed Pallas kernel)."""
        sp = self.sparsity
        if sp is not None and (sp.mvue or sp.fp8 or sp.kernel == "pallas"):
            raise ValueError("analog simulation needs the plain sparse matmul: turn off "
                             "sparsity.mvue, sparsity.fp8 and sparsity.kernel=pallas")
        self.analog = spec
        self.analog_seed = seed
        self.analog_count = AnalogState(jnp.zeros((), jnp.uint32)) if spec.linear_noise else None

    def set_analog_weights(self, w: jax.Array | None) -> None:
        """Use ``w`` (``(in, out)``, e.g. PCM weights read at time t) instead of this
        layer's effective weight; ``None`` restores the trained weight."""
        if w is not None and w.shape != (self.in_features, self.out_features):
            raise ValueError(f"analog weights of shape {w.shape} for a layer of "
                             f"{(self.in_features, self.out_features)}")
        self.analog_weights = None if w is None else AnalogWeights(jnp.asarray(w, jnp.float32))

    def _analog_forward(self, x: jax.Array, training: bool) -> jax.Array:
        """``x @ W`` on the simulated analog tile (normalised MVM when converters or output
        noise are on); noise only in training calls or with ``noise_in_eval``."""
        spec = self.analog or AnalogSpec()
        if self.analog_weights is not None:
            w = self.analog_weights[...]
        else:
            w, _ = self.effective_kernel_with_stats(training)
            if spec.clip_alpha:
                w = clip_weights_gaussian(w, spec.clip_alpha)
        key = None
        if self.analog_count is not None and (training or spec.noise_in_eval):
            key = _next_noise_key(self.analog_count, self.analog_seed)
            w = weight_noise(w, jax.random.fold_in(key, 2), spec.weight_noise,
                             spec.weight_noise_kind)
        w = w.astype(x.dtype)
        if spec.uses_normalised_mvm:
            return analog_matmul(x, w, spec, key)
        return jnp.matmul(x, w)

    def _maskllm_training_weight(self, w: jax.Array) -> jax.Array:
        """``W * M`` with this call's Gumbel-softmax mask (docs/methods.md §2). Advances the
        layer's call counter (the schedules' step and the Gumbel key, so a resumed run
        draws the same masks) and records :data:`MASK_STAT_NAMES` in ``mask_stats``."""
        spec, logits = self.sparsity, self.mask_logits[...]
        step = self.mask_step[...]
        tau = linear_schedule(spec.tau_start, spec.tau_end, step, self.schedule_steps)
        kappa = linear_schedule(spec.kappa_start, spec.kappa_end, step, self.schedule_steps)
        lam = linear_schedule(spec.reg_start, 0.0, step, self.schedule_steps)
        key = jax.random.fold_in(jax.random.key(self.mvue_seed), step)
        soft = gumbel_nm_mask(logits, key, tau, kappa, n=spec.n, m=spec.m, axis=0)
        self.mask_step[...] = step + 1
        w_eff = w * soft
        hard = argmax_nm_mask(logits, spec.n, spec.m, 0)
        gap = jnp.mean(jnp.abs(jax.lax.stop_gradient(soft) - hard))
        # The regulariser rewards keeping large weights by moving the *mask*: W is held
        # constant in it (as in the reference code, which squares the detached weight
        # times the mask), so in joint training it does not also push |W| up.
        kept_norm = jnp.sum(jnp.square(jax.lax.stop_gradient(w) * soft))
        self.mask_stats[...] = jnp.stack([
            -lam * kept_norm,
            mask_entropy(jax.lax.stop_gradient(logits), kappa), gap, tau, kappa])
        return w_eff

    def _sparse_kernel(self, training: bool) -> jax.Array:
        w = self.kernel[...]
        if self.sparsity is None:
            return w
        if self.sparsity.method == "maskllm":
            if training:
                return self._maskllm_training_weight(w)
            return w * argmax_nm_mask(self.mask_logits[...], self.sparsity.n,
                                      self.sparsity.m, 0)
        beta = None if self.beta is None else self.beta[...]
        return effective_weight(w, self.sparsity, beta, axis=0)

    def effective_kernel_with_stats(self, training: bool = False
                                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weight the matmul uses, shape ``(in, out)``, and the weight quantisation
        diagnostics (empty without weight quantisation). ``training=False`` gives the
        inference weight (MaskLLM: the argmax mask); ``training=True`` is what a training
        call multiplies by and may advance the layer's state."""
        w = self._sparse_kernel(training)
        if self.weight_quant is None:
            return w, {}
        return _quantize(w, self.weight_quant, self.weight_lsq, axis=0)

    def effective_kernel(self) -> jax.Array:
        """The inference weight, shape ``(in, out)`` (MaskLLM: ``W`` times its argmax
        mask)."""
        return self.effective_kernel_with_stats()[0]

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """``x`` as the matmul sees it (activation quantisation along the last axis);
        records the diagnostics in ``act_stats``."""
        if self.act_quant is None:
            return x
        x, stats = _quantize(x, self.act_quant, self.act_lsq, axis=-1)
        self.act_stats[...] = jnp.stack([stats[k] for k in STAT_NAMES])
        return x

    def pack(self, dtype: jnp.dtype | None = None) -> None:
        """Inference form: replace the kernel by the packed effective weight (``PackedNM``
        values as an ``nnx.Param``, positions as :class:`PackedState`), optionally cast to
        ``dtype``; the forward GEMM then runs ``sparsejax.kernels.nm_matmul`` (Pallas on
        GPU/TPU, XLA on CPU). Training state of the sparse method (beta, MVUE counter) is
        dropped."""
        if self.sparsity is None or self.sparsity.method == "dense" or self.sparsity.m > 4:
            raise ValueError("only an N:M sparse layer with m <= 4 can be packed")
        w = self.effective_kernel()
        p = pack_nm(w.astype(dtype or w.dtype), self.sparsity.n, self.sparsity.m, prune=True)
        self.packed_values = nnx.Param(p.values)
        self.packed_meta = PackedState(p.meta)
        self.kernel = nnx.data(None)
        self.beta = self.mvue_count = None
        self.mask_logits = self.mask_step = self.mask_stats = None
        self.weight_quant = self.weight_lsq = None  # already applied to the packed values

    @property
    def packed(self) -> PackedNM | None:
        """The packed weight after :meth:`pack`, else None."""
        values = getattr(self, "packed_values", None)
        if values is None:
            return None
        n, m = self.sparsity.n, self.sparsity.m
        return PackedNM(values[...], self.packed_meta[...], n, m,
                        (self.in_features, self.out_features), 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``."""
        dtype = self.dtype or x.dtype
        x = self.quantize_input(x.astype(dtype))
        training = not self.deterministic
        if self.packed is not None:
            y = nm_matmul(x, self.packed)
        elif self.analog is not None or self.analog_weights is not None:
            y = self._analog_forward(x, training)
        elif self.sparsity is None or self.sparsity.method == "maskllm":
            w, _ = self.effective_kernel_with_stats(training)
            y = jnp.matmul(x, w.astype(dtype))
        else:
            key = None
            if self.mvue_count is not None:  # a fresh key per call, resumable from state
                count = self.mvue_count[...]
                key = jax.random.fold_in(jax.random.key(self.mvue_seed), count)
                self.mvue_count[...] = count + 1
            packed = ((self.sparsity.n, self.sparsity.m)
                      if self.sparsity.kernel == "pallas" else None)
            y = nm_linear(x.astype(dtype), self.effective_kernel().astype(dtype), key,
                          mvue=self.sparsity.mvue, fp8_sim=self.sparsity.fp8, packed=packed)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh,
               "sigmoid": jax.nn.sigmoid}


class Activation(nnx.Module):
    """An elementwise activation (``fn`` in :data:`ACTIVATIONS`) as a module, so that
    path rules can find it: with an analog spec (:meth:`set_analog`) it adds activation
    noise to its output (Duque et al. 2024) in training calls, or also in evaluation with
    ``noise_in_eval``. Holds no state until a rule configures it."""

    def __init__(self, fn: str = "gelu"):
        if fn not in ACTIVATIONS:
            raise ValueError(f"activation '{fn}' is not one of {sorted(ACTIVATIONS)}")
        self.fn = fn
        self.analog: AnalogSpec | None = None
        self.analog_count: AnalogState | None = nnx.data(None)
        self.analog_seed = 0
        self.deterministic = False

    def set_analog(self, spec: AnalogSpec, seed: int = 0) -> None:
        """Add ``spec``'s activation noise (``act_noise``, ``act_noise_kind``,
        ``act_noise_correlated``) to this layer's output."""
        self.analog = spec
        self.analog_seed = seed
        self.analog_count = AnalogState(jnp.zeros((), jnp.uint32)) if spec.act_noise else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ACTIVATIONS[self.fn](x)
        spec = self.analog
        if self.analog_count is None or not (not self.deterministic or spec.noise_in_eval):
            return y
        key = _next_noise_key(self.analog_count, self.analog_seed)
        return activation_noise(y, key, spec.act_noise, spec.act_noise_correlated,
                                spec.act_noise_kind)


def pack_model(model: nnx.Module, dtype: jnp.dtype | None = None) -> list[str]:
    """Convert, in place, every N:M sparse ``Linear`` (``m <= 4``) whose packed form is
    smaller than its dense kernel into its packed inference form (:meth:`Linear.pack`).
    Returns the packed layer paths. The packed size comes from the format itself
    (``jax.eval_shape`` of ``pack_nm``): a layer whose group padding would make it no
    smaller stays dense."""
    packed = []
    for path, layer in nnx.iter_graph(model):
        if not isinstance(layer, Linear) or layer.sparsity is None:
            continue
        spec = layer.sparsity
        if spec.method == "dense" or spec.m > 4 or layer.packed is not None:
            continue
        dense = jax.ShapeDtypeStruct(layer.kernel.shape, dtype or layer.kernel.dtype)
        shapes = jax.eval_shape(lambda w, s=spec: pack_nm(w, s.n, s.m, prune=True), dense)
        packed_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))
        if packed_bytes >= dense.size * dense.dtype.itemsize:
            continue
        layer.pack(dtype)
        packed.append("/".join(str(p) for p in path))
    return packed


class Embed(nnx.Module):
    """Lookup table ``(num_embeddings, features)``; :meth:`attend` is the tied output head
    ``x @ table.T``."""

    def __init__(self, num_embeddings: int, features: int, *,
                 embedding_init: Initializer = DEFAULT_EMBED_INIT,
                 dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features),
                                                  jnp.float32))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids``: integer ``(...)`` -> ``(..., features)``."""
        out = jnp.take(self.embedding[...], ids, axis=0)
        return out.astype(self.dtype) if self.dtype else out

    def attend(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., features)`` -> logits ``(..., num_embeddings)``."""
        dtype = self.dtype or x.dtype
        return jnp.matmul(x.astype(dtype), self.embedding[...].astype(dtype).T)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32, output in ``dtype``."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype: jnp.dtype | None = None):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype or x.dtype)


# Mesh axes that split the batch (see ``sparsejax.sharding``; the convention lives here so
# that models can pin their activations without importing the launcher's sharding code).
BATCH_AXES = ("data", "fsdp")


def shard_batch(x: jax.Array) -> jax.Array:
    """Pin ``x`` (batch first) to the batch sharding of the ambient mesh (``jax.set_mesh``,
    set by the trainer), its other axes replicated; identity without a mesh. Models call
    it on the residual stream so that FSDP gathers weights instead of activations."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (evaluation) or ``rate == 0``."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
