"""Path rules: which layer gets which transform, decided by regexes over module paths.

A module path is the ``/``-joined attribute path from the model root, e.g.
``blocks/0/mlp/fc``. A rule's ``path`` is matched with ``re.fullmatch``; like qwix, the
first rule that matches a layer wins, and the user's model code is never edited. Rules are
any objects (or dicts) with a ``path`` and optional transform blocks - ``sparsity``;
``quant`` with ``weights`` / ``activations``; ``analog``; ``attention`` - each a dict with
a ``method`` (``sparsejax.transforms``) or a spec object, e.g. the config's
``RuleConfig``. ``Linear`` layers are matched by every rule but those whose only block is
``attention``; ``Activation`` layers only by rules that carry an ``analog`` block (the one
transform they take) and ``Attention`` modules only by rules with an ``attention`` block,
so a broad sparsity rule such as ``blocks/.*`` claims neither.

This module also reads the transforms back out of a configured model, whatever their
method: loss terms, metrics, snapshots, optimiser groups.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.nn.layers import Activation, Linear
from sparsejax.nn.slots import TransformHost, TransformSlot
from sparsejax.transforms import (
    LAYER_TYPE_NAMES,
    Context,
    GradientHook,
    ParamGroup,
    block_for_key,
    log_keys,
    rule_blocks,
    rule_field,
    rule_specs,
)

__all__ = ["analog_layers", "apply_rules", "apply_updates", "assign_rules", "has_updates",
           "layer_metrics", "loss_terms", "named_layers", "param_labels", "param_name",
           "rule_specs", "snapshot_changes", "snapshots", "sparse_layers", "transform_slots"]

LAYER_TYPES = (TransformHost,)  # the layers rules configure


def named_layers(model: nnx.Module, types: tuple[type, ...] = (Linear,)
                 ) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer), ...]`` for every sub-module of one of ``types`` (``nnx.iter_graph``
    order: attributes sorted by name)."""
    return [("/".join(str(p) for p in path), node)
            for path, node in nnx.iter_graph(model) if isinstance(node, types)]


def param_name(path: tuple) -> str:
    """``layers/0/attn/q/kernel``: the ``/``-joined module path and name of a parameter,
    from its key path in ``nnx.state(model, nnx.Param)``."""
    return jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")


def _block(rule: Any, key: str) -> Any:
    """The block at the dotted ``key`` of a rule (None when absent)."""
    block = rule
    for part in key.split("."):
        block = None if block is None else rule_field(block, part)
    return block


def _claimed_types(rule: Any) -> list[str]:
    """The layer types ``rule`` may claim: those its blocks' declarations name (a rule
    with no block at all, a dense one, claims linear layers)."""
    present = [b for b in rule_blocks() if _block(rule, b.key) is not None]
    claimed = {t for b in present for t in b.layers} if present else {"linear"}
    return [t for t in LAYER_TYPE_NAMES if t in claimed]


def assign_rules(model: nnx.Module, rules: Sequence[Any]) -> dict[str, int]:
    """Map each layer path to the index of the first rule whose ``path`` regex matches
    (``Linear`` layers: any rule without only an ``attention`` block; ``Activation``
    layers: rules with an ``analog`` block; ``Attention`` modules: rules with an
    ``attention`` block).

    Raises ``ValueError`` naming the rule and listing the layer paths when a rule matches
    no layer (a typo in a pattern must not silently train a dense model).
    """
    hosts = {t: [] for t in LAYER_TYPE_NAMES}
    for path, layer in named_layers(model, LAYER_TYPES):
        hosts[layer.layer_type].append(path)
    compiled = [re.compile(rule.path if not isinstance(rule, dict) else rule["path"])
                for rule in rules]
    eligible = [[p for t in _claimed_types(rule) for p in hosts[t]] for rule in rules]
    assignment: dict[str, int] = {}
    for path in [p for t in LAYER_TYPE_NAMES for p in hosts[t]]:
        for i, pattern in enumerate(compiled):
            if path in eligible[i] and pattern.fullmatch(path):
                assignment[path] = i
                break
    for i, pattern in enumerate(compiled):
        if not any(pattern.fullmatch(path) for path in eligible[i]):
            raise ValueError(f"rules.{i}.path '{pattern.pattern}' matches no layer; "
                             f"layer paths are: {', '.join(eligible[i])}")
        _check_needed_roles(rules[i], i, pattern, hosts)
    return assignment


def _check_needed_roles(rule: Any, index: int, pattern: re.Pattern,
                        hosts: dict[str, list[str]]) -> None:
    """Raise ``ValueError`` when a spec of ``rule`` needs a site role
    (:meth:`~sparsejax.transforms.Transform.needed_roles`, e.g. the analog tile's
    ``act_noise`` on activation outputs) that no layer the rule's path matches has."""
    try:
        specs = rule_specs(rule)
    except ValueError:  # apply_rules reports a bad block with its rule
        return
    for key, spec in specs.values():
        for role, field in spec.needed_roles():
            types = [t for t, r in block_for_key(key).layers.items() if r == role]
            paths = [p for t in types for p in hosts[t]]
            if not any(pattern.fullmatch(p) for p in paths):
                kind = "|".join(types)
                raise ValueError(f"rules.{index}.{key}.{field} is set but rules.{index}.path "
                                 f"'{pattern.pattern}' matches no {kind} layer; {kind} "
                                 f"paths are: {', '.join(paths)}")


def apply_rules(model: nnx.Module, rules: Sequence[Any], total_steps: int | None = None
                ) -> dict[str, int]:
    """Configure, in place, every layer the rules select; returns ``{path: rule index}``.

    Matched ``Linear`` layers get the rule's blocks as the stages of their pipeline
    (sparsity, weight / activation quantisation, analog tile); matched ``Activation``
    layers its analog block. Each layer's draws are keyed by a seed from its path.
    ``total_steps``: the run length for schedules a spec leaves at 0 (MaskLLM's). Errors
    name the rule and the layer.
    """
    assignment = assign_rules(model, rules)
    layers = dict(named_layers(model, LAYER_TYPES))
    planned: dict[str, dict[str, Any]] = {path: {} for path in assignment}
    for index, rule in enumerate(rules):
        paths = [p for p, i in assignment.items() if i == index]
        try:
            for stage, (_, spec) in rule_specs(rule).items():
                targets = [p for p in paths if _takes(layers[p], stage)]
                sites = [layers[p].site(stage) for p in targets]
                for path, layer_spec in zip(targets, spec.bind(total_steps).plan(sites),
                                            strict=True):
                    planned[path][stage] = layer_spec
        except ValueError as err:
            raise ValueError(f"rules.{index}: {err}") from None
    for path, index in assignment.items():
        try:
            layers[path].configure(planned[path], seed=zlib.crc32(path.encode()))
        except ValueError as err:
            raise ValueError(f"rules.{index} on layer {path}: {err}") from None
    return assignment


def _takes(layer: TransformHost, stage: str) -> bool:
    """Whether ``layer`` has the pipeline stage ``stage``."""
    return stage in dict(layer.stages())


def transform_slots(model: nnx.Module
                    ) -> Iterator[tuple[str, nnx.Module, str, TransformSlot]]:
    """``(layer path, layer, stage, slot)`` of every configured transform."""
    for path, layer in named_layers(model, LAYER_TYPES):
        for stage, slot in layer.slots():
            yield path, layer, stage, slot


def analog_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """The ``Linear`` and ``Activation`` layers that carry an analog transform."""
    return [(p, m) for p, m in named_layers(model, (Linear, Activation))
            if m.analog is not None]


def sparse_layers(model: nnx.Module) -> list[tuple[str, Linear]]:
    """The ``Linear`` layers whose weight transforms leave exact zeros (pruned weights)."""
    return [(p, m) for p, m in named_layers(model)
            if any(s.role == "weights" and s.spec.produces_zeros for _, s in m.slots())]


def loss_terms(model: nnx.Module) -> dict[str, jax.Array]:
    """The terms the transforms add to the training objective, summed over layers by
    name (MaskLLM: ``regularizer``), from the metrics of their last call - called inside
    the loss function right after the forward, they carry the gradient."""
    terms: dict[str, jax.Array] = {}
    for _, _, _, slot in transform_slots(model):
        for name in slot.spec.loss_terms:
            terms[name] = terms.get(name, jnp.zeros(())) + slot.metrics[name][...]
    return terms


def _raw(layer: nnx.Module, slot: TransformSlot) -> jax.Array | None:
    return layer.kernel[...] if slot.role == "weights" else None


def _size_weighted(out: dict[str, jax.Array],
                   totals: dict[str, list[tuple[jax.Array, int]]]) -> None:
    for key, values in totals.items():
        size = sum(n for _, n in values)
        out[key] = sum(v * (n / size) for v, n in values)


def layer_metrics(before: nnx.Module, after: nnx.Module) -> dict[str, jax.Array]:
    """Every transform's metrics between the model before and after one optimiser step:
    those of its last call (recorded by the step's forward) and its
    :meth:`~sparsejax.transforms.Transform.step_metrics`. Keys: ``<prefix>/<name>`` per
    layer and the size-weighted ``<aggregate>/<name>`` (prefixes declared by the rule
    blocks, :func:`~sparsejax.transforms.log_keys`: ``sparsity/<path>/flip_rate``,
    ``sparsity/flip_rate``, ``quant/<path>/weights/mse``, ``quant/weights/mse``, ...)."""
    old = {(p, stage): (layer, slot) for p, layer, stage, slot in transform_slots(before)}
    out: dict[str, jax.Array] = {}
    totals: dict[str, list[tuple[jax.Array, int]]] = {}
    for path, layer, stage, slot in transform_slots(after):
        old_layer, old_slot = old[(path, stage)]
        metrics = {**slot.metric_values(),
                   **slot.spec.step_metrics(slot.site, old_slot.view(_raw(old_layer, old_slot)),
                                            slot.view(_raw(layer, slot)))}
        per_layer, aggregate = log_keys(stage)
        for name, value in metrics.items():
            out[f"{per_layer.format(path=path)}/{name}"] = value
            if name not in slot.spec.per_layer_metrics:
                totals.setdefault(f"{aggregate}/{name}", []).append((value, slot.site.size))
    _size_weighted(out, totals)
    return out


def snapshots(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """``{aggregate key: {per-layer key: snapshot}}`` of the transforms that summarise a
    discrete choice (MaskLLM: the argmax candidate of every group), keyed
    ``<prefix>/<snapshot_name>_changed`` as :func:`snapshot_changes` logs them."""
    out: dict[str, dict[str, jax.Array]] = {}
    for path, layer, stage, slot in transform_slots(model):
        snap = slot.spec.snapshot(slot.site, slot.view(_raw(layer, slot)))
        if snap is None:
            continue
        per_layer, aggregate = log_keys(stage)
        name = f"{slot.spec.snapshot_name}_changed"
        out.setdefault(f"{aggregate}/{name}", {})[f"{per_layer.format(path=path)}/{name}"] = snap
    return out


def snapshot_changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
                     ) -> dict[str, float]:
    """The fraction of each snapshot that changed between two :func:`snapshots` (e.g.
    the last two log points), per layer and size-weighted per aggregate key."""
    out: dict[str, float] = {}
    for aggregate, layers in after.items():
        total, count = 0.0, 0
        for key, snap in layers.items():
            changed = float(np.mean(np.asarray(before[aggregate][key]) != np.asarray(snap)))
            out[key] = changed
            total, count = total + changed * np.size(snap), count + np.size(snap)
        if count:
            out[aggregate] = total / count
    return out


def param_labels(model: nnx.Module) -> tuple[Any, dict[str, ParamGroup]]:
    """The optimiser partition the transforms ask for: a pytree like
    ``nnx.state(model, nnx.Param)`` of labels (``"weights"``, or the name of the
    :class:`~sparsejax.transforms.ParamGroup` of the transform owning the parameter) and
    ``{name: group}``. Raises ``ValueError`` when two transforms ask for different
    groups under one name."""
    groups: dict[str, ParamGroup] = {}
    owners: dict[str, str] = {}
    for path, _, stage, slot in transform_slots(model):
        group = slot.spec.param_group()
        if group is None or not slot.params:
            continue
        if groups.setdefault(group.name, group) != group:
            raise ValueError(f"{slot.spec.kind} '{slot.spec.method}' transforms disagree on "
                             f"their optimiser group '{group.name}' ({groups[group.name]} vs "
                             f"{group}): it applies to the whole optimiser")
        for name in slot.params:
            owners["/".join(p for p in (path, stage, "params", name) if p)] = group.name

    def label(path: tuple[Any, ...], _: Any) -> str:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return owners.get("/".join(k for k in keys if k != "value"), "weights")

    return jax.tree_util.tree_map_with_path(label, nnx.state(model, nnx.Param)), groups


def has_updates(model: nnx.Module) -> bool:
    """Whether any transform of ``model`` has a gradient-time hook."""
    return any(isinstance(slot.spec, GradientHook) for *_, slot in transform_slots(model))


def apply_updates(model: nnx.Module, grads: nnx.Module, step: jax.Array) -> None:
    """Run every transform's gradient-time hook (``Transform.update``), in place:
    ``model`` holds the parameters and state, ``grads`` the same graph with the gradients
    as its parameters (``nnx.merge(graphdef, grads, rest)``). Each hook may rewrite its
    weight (in ``model``) and the weight's gradient (in ``grads``)."""
    pairs = zip(transform_slots(model), transform_slots(grads), strict=True)
    for (_, layer, _, slot), (_, grad_layer, _, _) in pairs:
        if not isinstance(slot.spec, GradientHook):
            continue
        ctx = Context(True, jax.random.key(layer.seed), step)
        w, g = slot.update(layer.kernel[...], grad_layer.kernel[...], ctx)
        layer.kernel[...] = w
        grad_layer.kernel[...] = g
