"""Basic layers: :class:`Linear`, :class:`Activation`, :class:`Embed`, :class:`LayerNorm`
and functional dropout.

Parameters are stored in float32; ``dtype`` is the compute dtype (float32 or bfloat16):
operands are cast to it before the matmul and the result is returned in it. Layers carry
the logical axes of their parameters (``axes``, read by ``sparsejax.sharding``) and the
transforms path rules give them (``sparsejax.transforms``); no layer knows any method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.kernels.nm_matmul import PackedNM, nm_matmul
from sparsejax.nn.slots import TransformHost, TransformSlot
from sparsejax.transforms import Packable, Site, Transform, check_pipeline, select_matmul

__all__ = ["ACTIVATIONS", "BATCH_AXES", "Activation", "Embed", "LayerNorm", "RMSNorm",
           "Linear", "PackedState", "WeightOverride", "dropout", "pack_model", "shard_batch",
           "tap_linear_inputs"]

Axes = tuple[str | None, ...]
Initializer = nnx.initializers.Initializer
DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
DEFAULT_EMBED_INIT = nnx.initializers.normal(0.02)

# Functions that see every Linear's input (``tap_linear_inputs``); empty in normal use.
_INPUT_TAPS: list[Callable[[Linear, jax.Array], None]] = []


@contextlib.contextmanager
def tap_linear_inputs(fn: Callable[[Linear, jax.Array], None]) -> Iterator[None]:
    """Within the block, every :class:`Linear` call passes ``(layer, x)`` to ``fn``, ``x``
    the input its weight multiplies (after the input transform), in call order - at trace
    time under ``jax.jit``. Calibration (``sparsejax.posttrain``) reads layer inputs so,
    without the model knowing."""
    _INPUT_TAPS.append(fn)
    try:
        yield
    finally:
        _INPUT_TAPS.remove(fn)


class PackedState(nnx.Variable):
    """The metadata (kept positions) of a packed N:M weight: saved, never trained."""


class WeightOverride(nnx.Variable):
    """A weight used instead of the transformed kernel (e.g. PCM weights read at time t by
    ``sparsejax.analog_eval``); the selected matmul still runs on it. Never trained."""


class Linear(TransformHost):
    """``y = x @ W + b`` with ``W`` of shape ``(in_features, out_features)``.

    Axis 0 of ``W`` is the contracting axis: N:M groups and quantisation blocks run along
    it (``docs/methods.md``, conventions). A layer is dense and full precision until
    :meth:`configure` (called by path rules, ``sparsejax.nn.apply_rules``) gives it
    transforms, which run as a pipeline (the stages the rule blocks declare for
    ``linear`` layers, in their order: the input transform, the weight transforms -
    sparsify, quantise, the analog tile - then the matmul the pipeline selects
    (``sparsejax.transforms.select_matmul``; plain ``x @ W`` when none), then the bias.

    Args:
      in_features, out_features: sizes of the last axis of ``x`` and of ``y``.
      use_bias: add a learned bias.
      kernel_init: initialiser of ``W``.
      axes: logical axes of ``W`` (``sparsejax.sharding``); the bias takes ``axes[1]``.
      dtype: compute dtype; ``None`` keeps the input's dtype.
      rngs: the ``nnx.Rngs`` that draws the initial weights.

    ``deterministic`` (set by ``model.eval()`` / ``model.train()``) switches stochastic
    transforms (MaskLLM's sampled masks, analog noise) to their inference form.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT, axes: Axes = (None, None),
                 dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.axes = dtype, tuple(axes)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            jnp.float32), logical_axes=self.axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32),
                               logical_axes=self.axes[1:]) if use_bias else None)
        self._init_stages()
        self.override: WeightOverride | None = nnx.data(None)
        self.packed_values: nnx.Param | None = nnx.data(None)
        self.packed_meta: PackedState | None = nnx.data(None)
        self.packed_nm: tuple[int, int] | None = None

    layer_type = "linear"

    def check_specs(self, specs: Mapping[str, Transform]) -> None:
        """The weight transforms, in pipeline order, must combine (``check_pipeline``)."""
        check_pipeline([specs[n] for n, role in self.stages()
                        if role == "weights" and n in specs])

    def setup_tensor(self, role: str) -> jax.Array | None:
        """Weight transforms are set up from the current kernel."""
        return self.kernel[...] if role == "weights" else None

    def slot_axes(self, role: str) -> tuple[str | None, ...]:
        return self.axes

    def site(self, stage: str) -> Site:
        """Where the transform of ``stage`` acts: the kernel, or the input features."""
        role = dict(self.stages())[stage]
        return Site(role, tuple(self.kernel.shape) if role == "weights"
                    else (self.in_features,))

    def _weight_slots(self) -> list[TransformSlot]:
        return [s for _, s in self.slots() if s.role == "weights"]

    def effective_kernel_with_metrics(self) -> tuple[jax.Array, dict[str, dict]]:
        """The inference weight, shape ``(in, out)`` - the kernel through every weight
        transform in inference form (MaskLLM: ``W`` times its argmax mask) - and each
        stage's metrics of that pass (``{"weight_quant": {"mse": ...}, ...}``)."""
        w, metrics = self.kernel[...], {}
        for stage, slot in self.slots():
            if slot.role == "weights":
                w, metrics[stage] = slot.inference(w)
        return w, metrics

    def effective_kernel(self) -> jax.Array:
        """The inference weight (:meth:`effective_kernel_with_metrics`)."""
        return self.effective_kernel_with_metrics()[0]

    def set_weight_override(self, w: jax.Array | None) -> None:
        """Use ``w`` (``(in, out)``) instead of the transformed kernel; ``None`` restores
        the trained weight."""
        if w is not None and w.shape != (self.in_features, self.out_features):
            raise ValueError(f"override weights of shape {w.shape} for a layer of "
                             f"{(self.in_features, self.out_features)}")
        self.override = None if w is None else WeightOverride(jnp.asarray(w, jnp.float32))

    def pack(self, dtype: jnp.dtype | None = None) -> None:
        """Inference form: replace the kernel by the packed effective weight (values as an
        ``nnx.Param``, positions as :class:`PackedState`), optionally cast to ``dtype``;
        the forward GEMM then runs ``sparsejax.kernels.nm_matmul``. The weight
        transforms, already applied to the packed values, are dropped."""
        packer = self.packer()
        if packer is None:
            raise ValueError("only a layer whose weight transform has an inference packing "
                             "(N:M sparsity with m <= 4) can be packed")
        w = self.effective_kernel()
        packed = packer.pack(w.astype(dtype or w.dtype))
        self.packed_values, self.packed_meta = nnx.Param(packed.values), PackedState(packed.meta)
        self.packed_nm = (packed.n, packed.m)
        self.kernel = nnx.data(None)
        for stage, slot in self.slots():
            if slot.role == "weights":
                setattr(self, stage, None)

    def packer(self) -> Transform | None:
        """The weight transform whose inference packing (``Packable``) this
        layer's weight would take, or None (no transform packs it, or already packed)."""
        if self.packed_values is not None:
            return None
        dense = jax.ShapeDtypeStruct(self.kernel.shape, self.kernel.dtype)
        return next((s.spec for s in self._weight_slots() if isinstance(s.spec, Packable)
                     and jax.eval_shape(s.spec.pack, dense) is not None), None)

    @property
    def packed(self) -> PackedNM | None:
        """The packed weight after :meth:`pack`, else None."""
        if self.packed_values is None:
            return None
        return PackedNM(self.packed_values[...], self.packed_meta[...], *self.packed_nm,
                        (self.in_features, self.out_features), 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in_features)`` -> ``(..., out_features)``."""
        dtype = self.dtype or x.dtype
        ctx = self.context()
        x = x.astype(dtype)
        for _, slot in self.slots():
            if slot.role == "activations":
                x = slot(x, ctx)
        for tap in _INPUT_TAPS:
            tap(self, x)
        if self.packed is not None:
            y = nm_matmul(x, self.packed)
        else:
            weight_slots = self._weight_slots()
            if self.override is not None:
                w = self.override[...]
            else:
                w = self.kernel[...]
                for slot in weight_slots:
                    w = slot(w, ctx)
            chosen = select_matmul([s.spec for s in weight_slots])
            slot = next((s for s in weight_slots if s.spec is chosen), None)
            y = jnp.matmul(x, w.astype(dtype)) if slot is None else slot.matmul(x, w, ctx)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh,
               "sigmoid": jax.nn.sigmoid, "silu": jax.nn.silu}


class Activation(TransformHost):
    """An elementwise activation (``fn`` in :data:`ACTIVATIONS`) as a module, so that path
    rules can find it: a transform acting on ``outputs`` (the analog tile's activation
    noise, Duque et al. 2024) changes its output. Holds no state until configured."""

    layer_type = "activation"

    def __init__(self, fn: str = "gelu"):
        if fn not in ACTIVATIONS:
            raise ValueError(f"activation '{fn}' is not one of {sorted(ACTIVATIONS)}")
        self.fn = fn
        self._init_stages()

    def site(self, stage: str) -> Site:
        """Every stage acts on the output, elementwise (statistics over one entry)."""
        return Site(dict(self.stages())[stage], (1,))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ACTIVATIONS[self.fn](x)
        slots = self.slots()
        if slots:
            ctx = self.context()
            for _, slot in slots:
                y = slot(y, ctx)
        return y


def pack_model(model: nnx.Module, dtype: jnp.dtype | None = None) -> list[str]:
    """Convert, in place, every ``Linear`` whose weight transform has a packed form
    (N:M with ``m <= 4``) smaller than its dense kernel into that form
    (:meth:`Linear.pack`). Returns the packed layer paths. The packed size comes from the
    format itself (``jax.eval_shape`` of the packing): a layer whose group padding would
    make it no smaller stays dense."""
    packed = []
    for path, layer in nnx.iter_graph(model):
        packer = layer.packer() if isinstance(layer, Linear) else None
        if packer is None:
            continue
        dense = jax.ShapeDtypeStruct(layer.kernel.shape, dtype or layer.kernel.dtype)
        shapes = jax.eval_shape(packer.pack, dense)
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
                 embedding_init: Initializer = DEFAULT_EMBED_INIT, axes: Axes = (None, None),
                 dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features),
                                                  jnp.float32), logical_axes=tuple(axes))

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


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (Zhang & Sennrich 2019; Llama): ``x / sqrt(mean(x^2) +
    eps) * scale``, statistics in float32, the scale applied in float32 and the result cast
    to ``dtype`` (as Hugging Face's ``LlamaRMSNorm`` up to where the cast happens)."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype: jnp.dtype | None = None):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(self.dtype or x.dtype)


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
