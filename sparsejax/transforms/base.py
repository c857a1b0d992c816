"""The transform protocol: one frozen spec class per method, with pure functions over
explicit state (optax's ``init`` / ``update`` pair; Qwix's frozen, keyword-only rule).

A *transform* changes what one site of a layer computes with: the weights of a
``Linear`` (sparsify, quantise, simulate an analog tile), its input activations
(quantise), or the output of an ``Activation`` (analog noise). Its spec class *is* the
schema of its config block: ``sparsity: {method: sste, n: 2, m: 4}`` builds
``SSTE(n=2, m=4)`` through :func:`build_spec`, and the spec's own checks name the field
they reject (:class:`SpecError`), once, in one place.

Every hook is a pure function of arrays. State lives in three explicit dicts the layer
keeps as NNX variables (so Orbax checkpoints and GSPMD shards them without special
cases): trainable ``params`` (MaskLLM's logits, LSQ's step), non-trainable ``state``
(S-STE's frozen beta, draw counters) and the ``metrics`` of the last call.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.errors import SpecError
from sparsejax.transforms.kinds import default_method, rule_blocks, weight_stages

__all__ = ["AttentionCalibration", "AttentionData", "AttentionMethod", "CachedAttention",
           "Calibration", "CustomMatmul", "GradientHook", "GramCalibration", "NoiseCounter",
           "Packable", "head_statistics", "Context", "Metrics",
           "ParamGroup", "Site", "SpecError", "Transform", "View", "build_spec",
           "check_pipeline", "methods", "register", "rule_field", "rule_specs",
           "select_matmul", "spec_class", "spec_fields"]

Metrics = dict[str, jax.Array]
State = dict[str, jax.Array]


class Site(NamedTuple):
    """Where a transform acts. ``role``: ``weights`` (a kernel ``(in, out)``, contracting
    axis 0), ``activations`` (a layer's input, features on axis -1), ``outputs`` (an
    activation layer's output) or ``attention`` (an attention module's queries, keys and
    values); ``shape``: the kernel's shape, ``(features,)`` or ``(heads, head_dim)``."""

    role: str
    shape: tuple[int, ...]

    @property
    def axis(self) -> int:
        """The contracting axis along which groups and blocks run."""
        return 0 if self.role == "weights" else -1

    @property
    def size(self) -> int:
        """The number of entries the site's statistics average over (aggregation weight)."""
        return math.prod(self.shape)


class Context(NamedTuple):
    """What a call knows besides its arrays: ``training`` (False in ``model.eval()``), the
    layer's base PRNG key (from its path; a transform folds its own checkpointed counter,
    or ``step``, into it for a fresh, resumable draw) and, in :meth:`Transform.update`, the
    optimiser step (0-based; None elsewhere)."""

    training: bool
    key: jax.Array
    step: jax.Array | None = None


class View(NamedTuple):
    """A transform's arrays at one moment: the untransformed tensor and its dicts."""

    x: jax.Array
    params: State
    state: State


@dataclass(frozen=True)
class ParamGroup:
    """An optimiser group for a transform's trainable params: its own Adam with the
    learning rate times ``lr_mult``, no weight decay; ``freeze_others``: every parameter
    outside such groups is frozen (no update, no gradient GEMMs)."""

    name: str
    lr_mult: float = 1.0
    freeze_others: bool = False


_REGISTRY: dict[str, dict[str, type[Transform]]] = {}


def register(kind: str, method: str):
    """Class decorator: make a spec class available to configs as ``{kind}: {method:
    <method>}`` (``kind``: one declared by a rule block, ``sparsejax.transforms.kinds``)."""

    def wrap(cls: type[Transform]) -> type[Transform]:
        table = _REGISTRY.setdefault(kind, {})
        if method in table and table[method] is not cls:
            raise ValueError(f"{kind} method '{method}' is registered twice "
                             f"({table[method].__module__} and {cls.__module__})")
        cls.kind, cls.method = kind, method
        table[method] = cls
        return cls

    return wrap


def methods(kind: str) -> tuple[str, ...]:
    """The registered method names of ``kind``, sorted."""
    return tuple(sorted(_REGISTRY.get(kind, {})))


def spec_class(kind: str, method: str) -> type[Transform]:
    if kind not in _REGISTRY:
        raise SpecError("method", f"no transforms of kind '{kind}'")
    if method not in _REGISTRY[kind]:
        raise SpecError("method", f"{kind} method '{method}' is not one of "
                        f"{'|'.join(methods(kind))}")
    return _REGISTRY[kind][method]


def _close(name: str, options: Sequence[str]) -> str:
    found = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean '{found[0]}'?)" if found else ""


def build_spec(kind: str, fields: Mapping[str, Any]) -> Transform:
    """The spec of a config block: ``{"method": name, <field>: value, ...}`` (``method``
    defaults to the kind's declared one, :func:`~sparsejax.transforms.kinds.default_method`).
    Raises :class:`SpecError` naming the field."""
    fields = dict(fields)
    cls = spec_class(kind, fields.pop("method", default_method(kind)))
    known = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    for name, value in list(fields.items()):
        if name in known:
            continue
        # A field of a sibling method left at its default is what a config written for
        # that method carries (``method=ste`` on an S-STE config, ``method=absmax_ste`` on
        # a DAT one): ignored. Set to anything else, the user expects it to act: refused.
        defaults = [f.default for other in _REGISTRY[kind].values()
                    for f in dataclasses.fields(other) if f.name == name]
        if defaults and all(value == d for d in defaults):
            del fields[name]
            continue
        raise SpecError(name, f"{kind} method '{cls.method}' has no field '{name}'"
                        f"{_close(name, known)}; its fields: {', '.join(known) or 'none'}",
                        unknown=not defaults)
    return cls(**fields)


def spec_fields(spec: Transform) -> dict[str, Any]:
    """The config block of ``spec``: ``{"method": ..., <every field>: value}`` (fields
    marked ``internal``, set by :meth:`Transform.plan`, are not configuration)."""
    return {"method": spec.method, **{f.name: getattr(spec, f.name)
                                      for f in dataclasses.fields(spec)
                                      if not f.metadata.get("internal")}}


def _coerce(cls: type, name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a field's annotation (bool / int / float / str)."""
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(name, f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SpecError(name, f"{name} must be a finite number, got {value}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SpecError(name, f"{name} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise SpecError(name, f"{name} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise SpecError(name, f"{name} must be a string, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class Transform:
    """Base of every spec. Subclasses are frozen, keyword-only dataclasses whose fields are
    the method's settings; they override the hooks they need. Hooks take the
    :class:`Site` and never see a module."""

    kind: ClassVar[str] = ""
    method: ClassVar[str] = ""
    # Sites the method can act on (``weights``, ``activations``, ``outputs``, ``attention``).
    roles: ClassVar[tuple[str, ...]] = ("weights",)
    # Metric names whose values are terms of the training objective (summed over layers).
    loss_terms: ClassVar[tuple[str, ...]] = ()
    # Metrics logged per layer only (no size-weighted aggregate).
    per_layer_metrics: ClassVar[tuple[str, ...]] = ()
    # Fields that configure the whole optimiser: every rule using the method must agree.
    optimizer_fields: ClassVar[tuple[str, ...]] = ()
    # The name of the discrete choice :meth:`snapshot` returns (logged as ``<name>_changed``).
    snapshot_name: ClassVar[str] = "mask"
    # The smallest valid config block when the defaults alone do not build (the
    # conformance test, tests/test_conformance.py, builds every method from it).
    example_block: ClassVar[Mapping[str, Any]] = {}
    # True for the Calibration capability (below): params and state a calibration set.
    calibrated: ClassVar[bool] = False
    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(type(self), f.name, getattr(self, f.name), hints.get(f.name))
            object.__setattr__(self, f.name, value)
        self.check()

    # ------------------------------------------------------------------ set-up
    def check(self) -> None:
        """Raise :class:`SpecError` for a bad combination of fields."""

    def check_site(self, site: Site) -> None:
        """Raise ``ValueError`` when the method cannot act on ``site`` (shapes)."""

    def check_after(self, earlier: Sequence[Transform]) -> None:
        """Raise :class:`SpecError` when the method cannot follow ``earlier`` (the
        transforms before it on the same weight)."""

    def needed_roles(self) -> tuple[tuple[str, str], ...]:
        """``((site role, field), ...)``: roles a rule using these settings must reach on
        some layer (the field that asks for it is named when none is matched)."""
        return ()

    def bind(self, total_steps: int) -> Transform:
        """The spec for a run of ``total_steps`` (e.g. schedules left at 0 take it)."""
        return self

    def plan(self, sites: Sequence[Site]) -> list[Transform]:
        """The spec of each of the ``sites`` one rule gives this method, e.g. a sparsity
        budget spread over the matched layers (ERK); raises :class:`SpecError` when the
        sites cannot meet the spec."""
        return [self] * len(sites)

    def params(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        """Extra trainable arrays, from the tensor at set-up (``x``: the kernel for
        weights, None for activations) and the layer's key."""
        return {}

    def param_axes(self, site: Site, kernel_axes: tuple[str | None, ...]
                   ) -> dict[str, tuple[str | None, ...]]:
        """Logical axes (see ``sparsejax.sharding``) of :meth:`params`, given the
        kernel's; params left out are replicated."""
        return {}

    def param_group(self) -> ParamGroup | None:
        """The optimiser group of :meth:`params` (None: trained with the weights)."""
        return None

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        """Non-trainable state (checkpointed), from the tensor at set-up."""
        return {}

    # ------------------------------------------------------------------ the call
    def apply(self, x: jax.Array, params: State, state: State, site: Site, ctx: Context
              ) -> tuple[jax.Array, State, Metrics]:
        """``(transformed x, new state, metrics)``; same shape and dtype as ``x``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ bookkeeping
    @property
    def produces_zeros(self) -> bool:
        """Whether the transformed weight holds exact zeros later transforms must keep."""
        return False

    @property
    def mask_group(self) -> int | None:
        """Length of the runs along the contracting axis within which the zeros are placed
        (N:M: ``m``), for tools that draw the pattern (``sparsejax compare``); None when
        the pattern has no such structure."""
        return None

    def blocking(self, site: Site) -> list[tuple[str, int]]:
        """``(what, rows)``: runs of rows along the contracting axis that must stay on one
        device (N:M groups, quantisation blocks); the mesh check asks every transform."""
        return []

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        """Metrics of one optimiser step, from the arrays before and after it."""
        return {}

    def snapshot(self, site: Site, view: View) -> jax.Array | None:
        """A discrete summary (e.g. the chosen mask candidates) compared between log
        points: the fraction that changed is logged as ``<snapshot_name>_changed``."""
        return None

    def inference(self, x: jax.Array, params: State, state: State, site: Site
                  ) -> tuple[jax.Array, Metrics]:
        """``x`` in inference form and the metrics of that call (no draws, no state
        change): :meth:`apply` outside training."""
        y, _, metrics = self.apply(x, params, state, site, Context(False, jax.random.key(0)))
        return y, metrics

    def inference_weight(self, w: jax.Array, params: State, state: State, site: Site
                         ) -> jax.Array:
        """The weight in inference form (:meth:`inference` without its metrics)."""
        return self.inference(w, params, state, site)[0]

    def summary(self) -> str:
        """``method`` plus the fields that differ from their defaults (layer listings)."""
        default = type(self)()
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)]
        return self.method + (f"({','.join(changed)})" if changed else "")


# --------------------------------------------------------------------------- capabilities
# What a method needs from the lifecycle beyond the core hooks, declared by mixing one of
# these into its spec class; generic code (layers, trainer, calibration, evaluation) asks
# ``isinstance(spec, <capability>)`` and calls the capability's methods, never a method's
# state by name.


class AttentionMethod:
    """Acts on an attention site (``role == "attention"``): replaces the softmax."""

    roles: ClassVar[tuple[str, ...]] = ("attention",)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               params: State, state: State, site: Site, ctx: Context,
               x: jax.Array | None = None) -> tuple[jax.Array, State, Metrics]:
        """The output ``(B, T, H, D)`` of queries ``q`` ``(B, T, H, D)`` at ``q_positions``
        ``(T,)`` over keys and values ``(B, L, H, D)`` at positions ``0 .. L-1``, causal
        (a query sees keys at or before its position), the new state and metrics. ``x``
        ``(B, L, C)``: the attention module's input (None where the caller has none)."""
        raise NotImplementedError


class CachedAttention(AttentionMethod):
    """An attention method that keeps its own decoding cache instead of ``{"k", "v"}``."""

    def init_cache(self, site: Site, batch: int, length: int, dtype: Any
                   ) -> dict[str, jax.Array]:
        """The empty decoding cache of ``length`` positions."""
        raise NotImplementedError

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array,
                      cache: dict[str, jax.Array], pos: jax.Array, params: State,
                      state: State, site: Site, ctx: Context
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Decoding through the method's cache: the tokens at ``pos .. pos + T - 1``
        (``q``, ``k``, ``v`` ``(B, T, H, D)``, input ``x`` ``(B, T, C)``) are written into
        it and attend to every cached position up to their own; returns the output and
        the cache. Must equal :meth:`~AttentionMethod.attend` on the whole sequence."""
        raise NotImplementedError


class CustomMatmul:
    """Replaces a ``Linear``'s ``x @ W`` (a sparse kernel, L-Mul, the analog tile)."""

    @property
    def provides_matmul(self) -> bool:
        """Whether :meth:`matmul` replaces the layer's ``x @ W`` with these settings."""
        return True

    @property
    def exclusive_matmul(self) -> str | None:
        """The field that makes this transform's matmul impossible to replace by another
        transform's (None when it may be replaced)."""
        return None

    def matmul(self, x: jax.Array, w: jax.Array, state: State, ctx: Context
               ) -> tuple[jax.Array, State]:
        """``x @ w`` (``x``: ``(..., in)``, ``w``: ``(in, out)``) and the new state."""
        raise NotImplementedError


class GradientHook:
    """Runs every training step after the backward pass, before the optimiser (dynamic
    sparse training: new masks, regrown weights)."""

    def update(self, site: Site, view: View, grad: jax.Array, ctx: Context
               ) -> tuple[jax.Array, State, jax.Array, Metrics]:
        """From the tensor, the dicts and the gradient of the tensor (``ctx.step``: the
        step), return ``(tensor, state, gradient, metrics)``. Weights only."""
        raise NotImplementedError


class Packable:
    """Has an inference packing of its transformed weight (``sparsejax.kernels``)."""

    def pack(self, w: jax.Array) -> Any:
        """The packing of an already transformed weight (e.g. ``PackedNM``), or None when
        these settings have none."""
        return None


class NoiseCounter:
    """Draws fresh noise per call from a checkpointed counter folded into the key; an
    evaluation that discards state sets the counter per batch (:meth:`with_draw_count`)."""

    def with_draw_count(self, state: State, count: jax.Array) -> State:
        """``state`` with the draw counter set to ``count`` (unchanged without one)."""
        return state


class Calibration:
    """The params and state are a calibration's result that nothing recomputes:
    ``train.init_from`` carries them from the same method at the same layer."""

    calibrated: ClassVar[bool] = True
    # Whether a run must start from ``train.init_from`` (the calibration needs a trained
    # model, e.g. CSKV's factors of the trained key / value projections).
    requires_init_from: ClassVar[bool] = False

    def is_calibrated(self, state: State) -> bool:
        """Whether the calibration has run (read from the method's own state)."""
        raise NotImplementedError


class GramCalibration(Calibration):
    """Calibrated from ``h = X^T X`` ``(in, in)`` of the layer's calibration inputs
    (post-training pruning, ``sparsejax prune``)."""

    def calibrate(self, site: Site, view: View, h: jax.Array) -> View:
        """The tensor, params and state after the method has seen ``h``."""
        raise NotImplementedError

    def stored_density(self, view: View) -> float:
        """The non-zeros the method stores, over the weight's size."""
        raise NotImplementedError


class AttentionData(NamedTuple):
    """What attention calibration reads at one attention module, over the calibration
    batches: ``q``, ``k``, ``v`` ``(N, T, H, D)`` of the student with every earlier
    module calibrated, their ``positions`` ``(T,)``, the mean ``|x|`` per channel of the
    module input ``(C,)``, the module's key / value projections ``(W_k, b_k, W_v, b_v)``
    and, for methods that match the teacher's outputs, its per-head output mean and std
    ``(H,)``."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    x_abs_mean: jax.Array
    kv_projection: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    target_mean: jax.Array | None = None
    target_std: jax.Array | None = None


def head_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-head mean and standard deviation ``(H,)`` of ``x`` ``(..., H, D)`` over every
    other axis (float32)."""
    x = jnp.moveaxis(x.astype(jnp.float32), -2, 0).reshape(x.shape[-2], -1)
    return x.mean(axis=1), x.std(axis=1)


class AttentionCalibration(Calibration):
    """Calibrated at the start of a run from a trained model (``train.init_from``) on
    :meth:`calibration_batches` of its training stream (``sparsejax.adapt``)."""

    # Whether calibration matches a teacher's per-head output statistics (head_statistics
    # of each attention module's output); only then does the teacher run.
    matches_teacher_outputs: ClassVar[bool] = False

    def calibration_batches(self) -> int:
        """How many training batches calibration reads (0: none, keep the initial state);
        by convention the method's ``calib_batches`` field."""
        return self.calib_batches

    def is_calibrated(self, state: State) -> bool:
        """By convention a ``calibrated`` flag the method keeps in its state."""
        return bool(state["calibrated"])

    def calibrate(self, site: Site, view: View, data: AttentionData) -> View:
        """The params and state after the method has seen ``data``."""
        raise NotImplementedError


def rule_field(obj: Any, name: str) -> Any:
    """``obj[name]`` of a mapping, else ``obj.name`` (None when absent): rules and their
    blocks may be dicts or config dataclasses."""
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def rule_specs(rule: Any) -> dict[str, tuple[str, Transform]]:
    """``{stage: (config key, spec)}`` of a rule's blocks (a rule: any object or mapping
    with ``sparsity`` or ``prune`` / ``quant.weights`` / ``quant.activations`` / ``analog`` entries,
    each a mapping with a ``method`` or a spec object). The weight transforms are checked
    together (:func:`check_pipeline`). Raises :class:`SpecError` whose ``field`` is the
    key inside the rule (``sparsity.mvue``)."""
    out: dict[str, tuple[str, Transform]] = {}
    for declared in rule_blocks():
        key, kind, stage = declared.key, declared.kind, declared.stage
        block = rule
        for part in key.split("."):
            block = None if block is None else rule_field(block, part)
        if block is None:
            continue
        try:
            spec = block if isinstance(block, Transform) else build_spec(
                kind, block if isinstance(block, Mapping) else vars(block))
        except SpecError as err:
            raise SpecError(f"{key}.{err.field}", str(err), unknown=err.unknown) from None
        if stage in out:
            raise SpecError(key, f"'{key}' and '{out[stage][0]}' both set the layer's "
                            f"{stage} stage; a rule takes one of them")
        out[stage] = (key, spec)
    chain = [out[stage] for stage in weight_stages() if stage in out]
    try:
        check_pipeline([spec for _, spec in chain])
    except SpecError as err:
        owner = next(k for k, spec in chain if err.field in
                     {f.name for f in dataclasses.fields(spec)} | {"method"})
        raise SpecError(f"{owner}.{err.field}", str(err)) from None
    return out


def check_pipeline(chain: Sequence[Transform]) -> None:
    """Check the transforms of one layer in pipeline order: each one may refuse what comes
    before it, and at most one may insist on its own matmul. Raises :class:`SpecError`
    naming the field of the later transform."""
    for i, spec in enumerate(chain):
        spec.check_after(chain[:i])
    exclusive = [s for s in chain if isinstance(s, CustomMatmul) and s.exclusive_matmul]
    if len(exclusive) > 1:
        first, other = exclusive[:2]
        raise SpecError(first.exclusive_matmul,
                        f"{first.kind} {first.exclusive_matmul} needs its own matmul, and so "
                        f"does {other.kind} '{other.method}': they cannot be combined")


def select_matmul(chain: Sequence[Transform]) -> Transform | None:
    """The transform whose :meth:`~Transform.matmul` a layer uses: the one that insists
    (:attr:`~Transform.exclusive_matmul`), else the last that provides one, else None
    (plain ``x @ W``)."""
    exclusive = [s for s in chain if isinstance(s, CustomMatmul) and s.exclusive_matmul]
    providers = [s for s in chain if isinstance(s, CustomMatmul) and s.provides_matmul]
    return exclusive[0] if exclusive else (providers[-1] if providers else None)
