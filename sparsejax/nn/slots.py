"""A transform placed on one site of a layer: the spec (static) and its three explicit
dicts of NNX variables - trainable ``params``, checkpointed ``state``, last-call
``metrics`` - so that Orbax saves them, GSPMD shards them and the optimiser finds them
like any other variable. The pure hooks of the spec do the work."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.transforms import Context, GradientHook, Site, Transform, View, layer_stages

__all__ = ["TransformHost", "TransformMetrics", "TransformParam", "TransformSlot",
           "TransformState"]


class TransformParam(nnx.Param):
    """A transform's trainable array (MaskLLM's logits, LSQ's step)."""


class TransformState(nnx.Variable):
    """A transform's non-trainable state (S-STE's frozen beta, draw counters):
    checkpointed, never touched by the optimiser."""


class TransformMetrics(nnx.Variable):
    """What a transform measured in its layer's last call (read by the trainer)."""


def _values(variables: nnx.Dict) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in variables.items()}


class TransformSlot(nnx.Module):
    """``spec`` acting on ``site``. ``x``: the tensor at set-up (the kernel for weights,
    None otherwise); ``seed`` keys the spec's initial draws and, through the layer's
    :class:`~sparsejax.transforms.Context`, its per-call draws. ``kernel_axes``: the
    logical axes of the layer's kernel, from which the spec derives its params' axes."""

    def __init__(self, spec: Transform, site: Site, x: jax.Array | None, seed: int,
                 kernel_axes: tuple[str | None, ...] = (None, None)):
        if site.role not in spec.roles:
            raise ValueError(f"{spec.kind} method '{spec.method}' cannot act on "
                             f"{site.role} (it acts on {', '.join(spec.roles)})")
        spec.check_site(site)
        self.spec = spec
        self.role, self.shape = site.role, tuple(site.shape)
        key = jax.random.key(seed)
        axes = spec.param_axes(site, kernel_axes)
        self.params = nnx.Dict({k: TransformParam(jnp.asarray(v), logical_axes=axes.get(k))
                                for k, v in spec.params(site, x, key).items()})
        self.state = nnx.Dict({k: TransformState(jnp.asarray(v))
                               for k, v in spec.init(site, x, key).items()})
        example = x if x is not None else jax.ShapeDtypeStruct(
            (1, 1, *site.shape) if site.role == "attention" else site.shape, jnp.float32)

        def metrics_of(p, s, v):  # those of a training call, then those of an update
            ctx = Context(True, jax.random.key(0), jnp.zeros((), jnp.int32))
            if site.role == "attention":  # v: one token's (1, 1, heads, head_dim)
                x = v.reshape(1, 1, -1)  # the module input: (1, 1, heads * head_dim)
                return spec.attend(v, v, v, jnp.zeros(1, jnp.int32), p, s, site, ctx, x=x)[2]
            out = spec.apply(v, p, s, site, ctx)[2]
            return {**out, **(spec.update(site, View(v, p, s), v, ctx)[3]
                              if isinstance(spec, GradientHook) else {})}

        shapes = jax.eval_shape(metrics_of, _values(self.params), _values(self.state), example)
        self.metrics = nnx.Dict({k: TransformMetrics(jnp.zeros(v.shape, v.dtype))
                                 for k, v in shapes.items()})

    @property
    def site(self) -> Site:
        return Site(self.role, self.shape)

    def view(self, x: jax.Array | None) -> View:
        """The slot's arrays now, with ``x`` the untransformed tensor."""
        return View(x, _values(self.params), _values(self.state))

    def metric_values(self) -> dict[str, jax.Array]:
        return _values(self.metrics)

    def set_state(self, state: dict[str, jax.Array]) -> None:
        """Replace the slot's state arrays by ``state`` (same names and shapes)."""
        for name, value in state.items():
            self.state[name][...] = value

    def set_view(self, view: View) -> None:
        """Replace the slot's params and state by those of ``view`` (a calibration's
        result; the tensor ``view.x`` is the layer's to store)."""
        for name, value in view.params.items():
            self.params[name][...] = value
        self.set_state(view.state)

    def _store(self, state: dict[str, jax.Array], metrics: dict[str, jax.Array]) -> None:
        for name, value in state.items():
            if value is not self.state[name][...]:
                self.state[name][...] = value
        for name, value in metrics.items():
            self.metrics[name][...] = value

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        """``spec.apply`` on ``x``; records the new state and the call's metrics."""
        y, state, metrics = self.spec.apply(x, _values(self.params), _values(self.state),
                                            self.site, ctx)
        self._store(state, metrics)
        return y

    def matmul(self, x: jax.Array, w: jax.Array, ctx: Context) -> jax.Array:
        """``spec.matmul``; records the new state."""
        y, state = self.spec.matmul(x, w, _values(self.state), ctx)
        self._store(state, {})
        return y

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               ctx: Context, x: jax.Array | None = None) -> jax.Array:
        """``spec.attend`` (attention sites); records the new state and the metrics."""
        y, state, metrics = self.spec.attend(q, k, v, q_positions, _values(self.params),
                                             _values(self.state), self.site, ctx, x=x)
        self._store(state, metrics)
        return y

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array,
                      cache: dict[str, jax.Array], pos: jax.Array, ctx: Context
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``spec.attend_cached`` (decoding through the transform's own cache)."""
        return self.spec.attend_cached(q, k, v, x, cache, pos, _values(self.params),
                                       _values(self.state), self.site, ctx)

    def update(self, x: jax.Array, grad: jax.Array, ctx: Context
               ) -> tuple[jax.Array, jax.Array]:
        """``spec.update``: the new tensor and gradient; records state and metrics."""
        x, state, grad, metrics = self.spec.update(self.site, self.view(x), grad, ctx)
        self._store(state, metrics)
        return x, grad

    def inference(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x`` in inference form and the metrics of that call (no draws, no state
        change)."""
        return self.spec.inference(x, _values(self.params), _values(self.state), self.site)


class TransformHost(nnx.Module):
    """Base of the layers path rules configure (``Linear``, ``Activation``, ``Attention``).

    A layer's stages are those the rule blocks declare for its ``layer_type``
    (:func:`~sparsejax.transforms.layer_stages`), in pipeline order; each is an attribute
    holding a :class:`TransformSlot` or None. Subclasses call :meth:`_init_stages` in their
    ``__init__`` and say where a stage acts (:meth:`site`), which tensor a transform is set
    up from (:meth:`setup_tensor`) and the logical axes of its params (:meth:`slot_axes`).
    """

    layer_type: ClassVar[str] = ""

    def _init_stages(self) -> None:
        for stage, _ in self.stages():
            setattr(self, stage, nnx.data(None))
        self.seed = 0
        self.deterministic = False

    @classmethod
    def stages(cls) -> tuple[tuple[str, str], ...]:
        """``((stage, site role), ...)`` of this layer type, in pipeline order."""
        return layer_stages(cls.layer_type)

    def site(self, stage: str) -> Site:
        """Where the transform of ``stage`` acts."""
        raise NotImplementedError

    def setup_tensor(self, role: str) -> jax.Array | None:
        """The tensor a transform of ``role`` is set up from (None: none)."""
        return None

    def slot_axes(self, role: str) -> tuple[str | None, ...]:
        """The logical axes a transform of ``role`` derives its params' axes from."""
        return (None, None)

    def check_specs(self, specs: Mapping[str, Transform]) -> None:
        """Raise ``ValueError`` for a combination of transforms this layer refuses."""

    def configure(self, specs: Mapping[str, Transform], seed: int = 0) -> None:
        """Give this layer its transforms, ``{stage: spec}`` (stages left out are removed);
        ``seed`` keys their draws. Raises ``ValueError`` (a ``SpecError`` naming the field
        for a combination the layer refuses)."""
        names = [name for name, _ in self.stages()]
        unknown = set(specs) - set(names)
        if unknown:
            raise ValueError(f"a {self.layer_type} layer takes only {'|'.join(names)} "
                             f"transforms, got {sorted(unknown)}")
        self.check_specs(specs)
        self.seed = seed
        for name, role in self.stages():
            spec = specs.get(name)
            setattr(self, name, None if spec is None else TransformSlot(
                spec, self.site(name), self.setup_tensor(role), seed, self.slot_axes(role)))

    def slots(self) -> list[tuple[str, TransformSlot]]:
        """``[(stage, slot), ...]`` of the configured stages, in pipeline order."""
        return [(n, getattr(self, n)) for n, _ in self.stages() if getattr(self, n) is not None]

    def context(self) -> Context:
        """The call context of this layer's transforms (training flag, base key)."""
        return Context(not self.deterministic, jax.random.key(self.seed))
