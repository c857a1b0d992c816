"""Path rules: which layer gets which transform, decided by regexes over module paths.

A module path is the ``/``-joined attribute path from the model root, e.g.
``blocks/0/mlp/fc``. A rule's ``pattern`` is matched with ``re.fullmatch``; like qwix, the
first rule that matches a layer wins, and the user's model code is never edited.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import nnx

from sparsejax.nn import Linear

__all__ = ["assign_rules", "named_layers"]


def named_layers(model: nnx.Module, types: tuple[type, ...] = (Linear,)
                 ) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer), ...]`` for every sub-module of one of ``types`` (``nnx.iter_graph``
    order: attributes sorted by name)."""
    return [("/".join(str(p) for p in path), node)
            for path, node in nnx.iter_graph(model) if isinstance(node, types)]


def assign_rules(model: nnx.Module, rules: Sequence[Any], types: tuple[type, ...] = (Linear,)
                 ) -> dict[str, int]:
    """Map each layer path to the index of the first rule whose ``pattern`` matches it.

    Raises ``ValueError`` naming the rule when a rule matches no layer (a typo in a
    pattern must not silently train a dense model).
    """
    layers = [path for path, _ in named_layers(model, types)]
    compiled = [re.compile(rule.pattern) for rule in rules]
    assignment: dict[str, int] = {}
    for path in layers:
        for i, pattern in enumerate(compiled):
            if pattern.fullmatch(path):
                assignment[path] = i
                break
    for i, pattern in enumerate(compiled):
        if not any(pattern.fullmatch(path) for path in layers):
            shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
            raise ValueError(f"rules.{i}.pattern '{pattern.pattern}' matches no layer; "
                             f"layer paths are: {shown}")
    return assignment
