"""Kinds of transform, each declared once: what a rule's block is called, which methods it
builds, where it runs in a layer's pipeline, which layers take it and how its metrics
are logged.

A kind's package (``transforms/sparsity/``, ``transforms/quant/``, ...) declares its blocks
in its ``__init__`` with :func:`declare_block`; everything else - the rule schema of the
config (``RuleConfig``), which layers a rule may claim, the stages a layer holds, the
pipeline order, the default method, the TensorBoard keys - is read from these
declarations. A new kind is its package (one declaration plus its methods) and nothing
else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LAYER_TYPE_NAMES", "RuleBlock", "block_for_key", "declare_block", "default_method",
           "layer_stages", "log_keys", "rule_blocks", "stage_role", "weight_stages"]

# The layer types transforms act on (``sparsejax.nn``: ``Linear``, ``Activation`` and
# ``Attention`` declare theirs as ``layer_type``).
LAYER_TYPE_NAMES = ("linear", "activation", "attention")


@dataclass(frozen=True)
class RuleBlock:
    """One block of a path rule.

    ``key``: its place in a rule (``sparsity``; ``quant.weights`` for a nested block);
    ``kind``: the registry kind its ``method`` names (:func:`~sparsejax.transforms.register`);
    ``stage``: the layer attribute it fills (two blocks may share one: ``sparsity`` and
    ``prune``, and then a rule takes one of them); ``order``: the stage's place in a
    layer's pipeline (lower runs first); ``default_method``: the method of a block without
    ``method:``; ``layers``: ``{layer type: site role}`` of the layers that take it;
    ``log``: ``(per-layer key prefix with {path}, aggregate key prefix)`` of its metrics;
    ``doc``: one line for the config schema's documentation."""

    key: str
    kind: str
    stage: str
    order: int
    default_method: str
    layers: Mapping[str, str]
    log: tuple[str, str]
    doc: str = ""

    def __post_init__(self):
        unknown = set(self.layers) - set(LAYER_TYPE_NAMES)
        if unknown:
            raise ValueError(f"block '{self.key}': unknown layer types {sorted(unknown)}")


_BLOCKS: dict[str, RuleBlock] = {}


def declare_block(block: RuleBlock) -> RuleBlock:
    """Make ``block`` a rule block (called once, by its kind's package)."""
    if block.key in _BLOCKS and _BLOCKS[block.key] != block:
        raise ValueError(f"rule block '{block.key}' is declared twice")
    clash = [b for b in _BLOCKS.values() if b.stage == block.stage and b.key != block.key
             and (b.order, dict(b.layers)) != (block.order, dict(block.layers))]
    if clash:
        raise ValueError(f"blocks '{clash[0].key}' and '{block.key}' share stage "
                         f"'{block.stage}' but disagree on its order or layers")
    _BLOCKS[block.key] = block
    return block


def rule_blocks() -> tuple[RuleBlock, ...]:
    """Every declared block, in pipeline order (ties: declaration order)."""
    return tuple(sorted(_BLOCKS.values(), key=lambda b: b.order))


def block_for_key(key: str) -> RuleBlock:
    return _BLOCKS[key]


def default_method(kind: str) -> str:
    """The method a block of ``kind`` without ``method:`` gets."""
    found = {b.default_method for b in _BLOCKS.values() if b.kind == kind}
    if len(found) != 1:
        raise KeyError(f"kind '{kind}' has {len(found)} default methods")
    return found.pop()


def layer_stages(layer_type: str) -> tuple[tuple[str, str], ...]:
    """``((stage, site role), ...)`` of a layer type, in pipeline order."""
    out: dict[str, str] = {}
    for block in rule_blocks():
        if layer_type in block.layers:
            out.setdefault(block.stage, block.layers[layer_type])
    return tuple(out.items())


def stage_role(layer_type: str, stage: str) -> str:
    """The site role of ``stage`` on a layer of ``layer_type``."""
    return dict(layer_stages(layer_type))[stage]


def weight_stages() -> tuple[str, ...]:
    """The stages that transform a ``Linear``'s weight, in pipeline order."""
    return tuple(s for s, role in layer_stages("linear") if role == "weights")


def log_keys(stage: str) -> tuple[str, str]:
    """``(per-layer prefix with {path}, aggregate prefix)`` of a stage's metrics."""
    return next(b.log for b in rule_blocks() if b.stage == stage)
