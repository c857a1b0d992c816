"""Path rules: which layer gets which transform, decided by regexes over module paths.

A module path is the ``/``-joined attribute path from the model root, e.g.
``blocks/0/mlp/fc``. A rule's ``path`` is matched with ``re.fullmatch``; like qwix, the
first rule that matches a layer wins, and the user's model code is never edited. Rules are
any objects with a ``path`` attribute and optional transform specs (``sparsity``;
``quant`` with ``weights`` / ``activations``; ``analog``), e.g. the config's
``RuleConfig``. ``Linear`` layers are matched by every rule; ``Activation`` layers only by
rules that carry an ``analog`` block (the one transform they take), so a broad sparsity
rule such as ``blocks/.*`` does not claim them.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.analog import AnalogSpec
from sparsejax.nn.layers import MASK_STAT_NAMES, Activation, Linear
from sparsejax.quant import STAT_NAMES, QuantSpec
from sparsejax.sparsity import NMSpec, flip_rate, threshold_nm

__all__ = ["analog_layers", "apply_rules", "assign_rules", "layer_metrics", "mask_choice_changes",
           "mask_choices", "mask_layers", "mask_training_options", "named_layers",
           "quant_metrics", "quantized_layers", "regularization_loss", "sparse_layers"]

NEAR_THRESHOLD = 1e-3  # weights within 1e-3 of their group threshold: the ones about to flip


def named_layers(model: nnx.Module, types: tuple[type, ...] = (Linear,)
                 ) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer), ...]`` for every sub-module of one of ``types`` (``nnx.iter_graph``
    order: attributes sorted by name)."""
    return [("/".join(str(p) for p in path), node)
            for path, node in nnx.iter_graph(model) if isinstance(node, types)]


def assign_rules(model: nnx.Module, rules: Sequence[Any]) -> dict[str, int]:
    """Map each layer path to the index of the first rule whose ``path`` regex matches
    (``Linear`` layers: any rule; ``Activation`` layers: rules with an ``analog`` block).

    Raises ``ValueError`` naming the rule and listing the layer paths when a rule matches
    no layer (a typo in a pattern must not silently train a dense model).
    """
    linears = [path for path, _ in named_layers(model, (Linear,))]
    activations = [path for path, _ in named_layers(model, (Activation,))]
    compiled = [re.compile(rule.path) for rule in rules]
    eligible = [linears + (activations if _field(rule, "analog") is not None else [])
                for rule in rules]
    assignment: dict[str, int] = {}
    for path in linears + activations:
        for i, pattern in enumerate(compiled):
            if path in eligible[i] and pattern.fullmatch(path):
                assignment[path] = i
                break
    for i, pattern in enumerate(compiled):
        if not any(pattern.fullmatch(path) for path in eligible[i]):
            raise ValueError(f"rules.{i}.path '{pattern.pattern}' matches no layer; "
                             f"layer paths are: {', '.join(eligible[i])}")
        analog = _field(rules[i], "analog")
        if (analog is not None and (_field(analog, "act_noise") or 0) > 0
                and not any(pattern.fullmatch(p) for p in activations)):
            raise ValueError(f"rules.{i}.analog.act_noise is set but rules.{i}.path "
                             f"'{pattern.pattern}' matches no activation layer; activation "
                             f"paths are: {', '.join(activations)}")
    return assignment


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _spec(cls: type, values: Any) -> Any:
    """``cls`` (a dataclass) from an object or dict, ignoring fields ``cls`` lacks."""
    if values is None:
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    values = values if isinstance(values, dict) else vars(values)
    return cls(**{k: v for k, v in values.items() if k in fields})


def apply_rules(model: nnx.Module, rules: Sequence[Any], total_steps: int | None = None
                ) -> dict[str, int]:
    """Configure, in place, every layer the rules select; returns ``{path: rule index}``.

    A rule's ``sparsity`` (an object or dict with the fields of ``NMSpec``) makes the
    matched ``Linear`` layers N:M sparse; its ``quant.weights`` / ``quant.activations``
    (fields of ``QuantSpec``) quantise them, after the sparsity; its ``analog`` (fields of
    ``sparsejax.analog.AnalogSpec``) simulates matched ``Linear`` layers on analog tiles
    and adds activation noise to matched ``Activation`` layers. ``total_steps``: the
    length of MaskLLM's schedules when a rule leaves ``schedule_steps`` at 0. Errors name
    the rule and the layer.
    """
    assignment = assign_rules(model, rules)
    layers = dict(named_layers(model, (Linear, Activation)))
    for path, index in assignment.items():
        sparsity, quant = _field(rules[index], "sparsity"), _field(rules[index], "quant")
        analog = _field(rules[index], "analog")
        seed = zlib.crc32(path.encode())
        if isinstance(layers[path], Activation):
            layers[path].set_analog(_spec(AnalogSpec, analog), seed=seed)
            continue
        try:
            if sparsity is not None:
                layers[path].set_sparsity(_spec(NMSpec, sparsity), seed=seed,
                                          total_steps=total_steps)
            if quant is not None:
                layers[path].set_quant(_spec(QuantSpec, _field(quant, "weights")),
                                       _spec(QuantSpec, _field(quant, "activations")))
            if analog is not None:
                layers[path].set_analog(_spec(AnalogSpec, analog), seed=seed)
        except ValueError as err:
            raise ValueError(f"rules.{index} on layer {path}: {err}") from None
    return assignment


def analog_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """The ``Linear`` and ``Activation`` layers that carry an analog spec."""
    return [(p, m) for p, m in named_layers(model, (Linear, Activation))
            if m.analog is not None]


def sparse_layers(model: nnx.Module) -> list[tuple[str, Linear]]:
    return [(p, m) for p, m in named_layers(model)
            if m.sparsity is not None and m.sparsity.method != "dense"]


def mask_layers(model: nnx.Module) -> list[tuple[str, Linear]]:
    """The MaskLLM layers (learned N:M masks) of ``model``."""
    return [(p, m) for p, m in sparse_layers(model) if m.mask_logits is not None]


def regularization_loss(model: nnx.Module) -> jax.Array:
    """The sum of the regulariser terms the layers recorded in their last training call
    (MaskLLM: ``-lambda_t * sum (W * M)^2``); 0 without such layers. Called on the model
    inside the loss function right after its forward, it carries the gradient."""
    return sum((m.mask_stats[...][0] for _, m in mask_layers(model)), jnp.zeros(()))


def mask_training_options(model: nnx.Module) -> tuple[bool, float]:
    """``(freeze_weights, mask_lr_mult)`` of the model's MaskLLM layers (``(False, 1.0)``
    without any). Raises ``ValueError`` when layers disagree (both options act on the
    whole optimiser)."""
    options = {(m.sparsity.freeze_weights, m.sparsity.mask_lr_mult)
               for _, m in mask_layers(model)}
    if len(options) > 1:
        raise ValueError("maskllm rules disagree on freeze_weights / mask_lr_mult "
                         f"({sorted(options)}); they apply to the whole optimiser")
    return options.pop() if options else (False, 1.0)


def mask_choices(model: nnx.Module) -> dict[str, jax.Array]:
    """``{path: argmax candidate index per group}`` of every MaskLLM layer (int32,
    the logits' shape without the candidate axis)."""
    return {p: jnp.argmax(m.mask_logits[...], -1) for p, m in mask_layers(model)}


def mask_choice_changes(before: dict[str, Any], after: dict[str, Any]
                        ) -> dict[str, float]:
    """``sparsity/<path>/mask_changed``: the fraction of groups whose argmax candidate
    differs between two :func:`mask_choices` (e.g. the last two log points), plus the
    size-weighted ``sparsity/mask_changed``."""
    out: dict[str, float] = {}
    total, count = 0.0, 0
    for path, choice in after.items():
        changed = float(np.mean(np.asarray(before[path]) != np.asarray(choice)))
        out[f"sparsity/{path}/mask_changed"] = changed
        total += changed * np.size(choice)
        count += np.size(choice)
    if count:
        out["sparsity/mask_changed"] = total / count
    return out


def quantized_layers(model: nnx.Module) -> list[tuple[str, Linear]]:
    return [(p, m) for p, m in named_layers(model)
            if m.weight_quant is not None or m.act_quant is not None]


def _size_weighted(out: dict[str, jax.Array], prefix: str,
                   totals: dict[str, list[tuple[jax.Array, int]]]) -> None:
    for name, values in totals.items():
        size = sum(n for _, n in values)
        out[f"{prefix}/{name}"] = sum(v * (n / size) for v, n in values)


def quant_metrics(model: nnx.Module) -> dict[str, jax.Array]:
    """Per quantised layer, ``quant/<path>/{weights,activations}/<stat>`` for the stats of
    ``sparsejax.quant.quantize_with_stats`` (``mse_naive`` = before denoising, ``mse`` =
    after, ``scale`` = mean s_g for DAT, ``clip_frac``), plus size-weighted aggregates
    ``quant/{weights,activations}/<stat>``. Activation stats are those of the layer's
    last call (the training batch of this step)."""
    out: dict[str, jax.Array] = {}
    totals: dict[str, dict[str, list]] = {"weights": {}, "activations": {}}
    for path, layer in quantized_layers(model):
        found = {}
        if layer.weight_quant is not None:
            found["weights"] = (layer.effective_kernel_with_stats()[1], layer.kernel.size)
        if layer.act_stats is not None:
            found["activations"] = (dict(zip(STAT_NAMES, layer.act_stats[...], strict=True)),
                                    layer.in_features)
        for tensor, (stats, size) in found.items():
            for name, value in stats.items():
                out[f"quant/{path}/{tensor}/{name}"] = value
                totals[tensor].setdefault(name, []).append((value, size))
    for tensor, values in totals.items():
        _size_weighted(out, f"quant/{tensor}", values)
    return out


def layer_metrics(before: nnx.Module, after: nnx.Module) -> dict[str, jax.Array]:
    """What researchers watch in N:M training, per sparse layer and in aggregate, between
    the model before and after one optimiser step:

    * ``sparsity``: fraction of zeros in the effective weight (realised sparsity);
    * ``flip_rate``: fraction of mask entries that changed in this step;
    * ``near_threshold``: fraction of weights whose magnitude lies within 1e-3 of their
      group's threshold tau, not counting the pruned entry that defines tau;
    * ``beta``: S-STE's frozen scale;
    * MaskLLM layers: ``flip_rate`` of their argmax masks (``near_threshold`` does not
      apply), and from the step's forward the :data:`MASK_STAT_NAMES` (regulariser term,
      mean candidate entropy in nats, mean |soft - hard| mask gap, tau, kappa).

    Keys: ``sparsity/<path>/<metric>`` and the size-weighted ``sparsity/<metric>``; plus
    the quantisation diagnostics of :func:`quant_metrics` for the model after the step.
    """
    old = dict(sparse_layers(before))
    out: dict[str, jax.Array] = {}
    totals: dict[str, list[tuple[jax.Array, int]]] = {}
    for path, layer in sparse_layers(after):
        spec, w = layer.sparsity, layer.kernel[...]
        if layer.mask_logits is not None:
            before_mask = old[path].effective_kernel() != 0
            w_eff = layer.effective_kernel()
            stats = {"sparsity": jnp.mean(w_eff == 0),
                     "flip_rate": jnp.mean(before_mask != (w_eff != 0)),
                     **dict(zip(MASK_STAT_NAMES, layer.mask_stats[...], strict=True))}
        else:
            tau = threshold_nm(w, spec.n, spec.m, 0)
            near = jnp.sum(jnp.abs(jnp.abs(w) - tau) < NEAR_THRESHOLD) - w.size // spec.m
            stats = {
                "sparsity": jnp.mean(layer.effective_kernel() == 0),
                "flip_rate": flip_rate(old[path].kernel[...], w, spec.n, spec.m, 0),
                "near_threshold": near / w.size,
            }
        if layer.beta is not None:
            out[f"sparsity/{path}/beta"] = layer.beta[...]
        for name, value in stats.items():
            out[f"sparsity/{path}/{name}"] = value
            totals.setdefault(name, []).append((value, w.size))
    _size_weighted(out, "sparsity", totals)
    out.update(quant_metrics(after))
    return out
