"""The dependency rule of docs/architecture.md, checked on the source: every sparsejax
import (function-level ones included) goes to the same or a lower layer, model files import
only the layers (``sparsejax.nn``), transforms never import a module, no import cycles, and
function-level sparsejax imports only in the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# Lowest first; a module may import its own layer or a lower one (docs/architecture.md).
LAYERS = [
    ("numerics", ["errors", "dtypes", "estimators", "special", "distributions", "sparsity",
                  "quant", "analog", "sparse_linear", "numerics", "kernels"]),
    ("transforms", ["transforms"]),
    ("nn", ["nn"]),
    ("models", ["models"]),
    ("config and data", ["config", "corpus", "data"]),
    ("runtime", ["tasks", "sharding", "checkpoint", "reporting", "loop", "distributed",
                 "optim", "evaluation", "calibration", "hf", "runs"]),
    ("commands", ["train", "adapt", "posttrain", "compress", "compare", "sample",
                  "analog_eval", "export", "evaluate"]),
    ("entry points", ["cli", "__main__", "__init__"]),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _sources() -> dict[str, Path]:
    files = {p: "sparsejax." + ".".join(p.relative_to(REPO / "sparsejax").with_suffix("").parts)
             for p in (REPO / "sparsejax").rglob("*.py")}
    files.update({p: "sparsejax.kernels." + p.stem for p in (REPO / "kernels").glob("*.py")})
    return {m.removesuffix(".__init__"): p for p, m in files.items()}


def _unit(module: str) -> str:
    """``sparsejax.transforms.base`` -> ``transforms``; ``sparsejax`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported sparsejax module, line, inside a function)`` of a source file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names = ([a.name for a in child.names] if isinstance(child, ast.Import) else
                     [child.module or ""] if isinstance(child, ast.ImportFrom)
                     and not child.level else [])
            found.extend((n, child.lineno, inner) for n in names if n.startswith("sparsejax"))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def test_every_module_has_a_layer():
    missing = sorted({_unit(m) for m in _sources()} - set(LAYER_OF))
    assert not missing, f"add {missing} to a layer in docs/architecture.md and LAYERS"


def test_imports_go_to_the_same_or_a_lower_layer():
    upward = [f"{path.relative_to(REPO)}:{line} imports {target}"
              for module, path in _sources().items()
              for target, line, _ in _imports(path)
              if LAYER_OF[_unit(target)] > LAYER_OF[_unit(module)]]
    assert not upward, upward


def test_models_import_only_layers_and_transforms_never_a_module():
    bad = []
    for module, path in _sources().items():
        unit = _unit(module)
        for target, line, _ in _imports(path):
            other = _unit(target)
            if unit == "models" and other not in ("nn", "models", "errors"):
                bad.append(f"{path.relative_to(REPO)}:{line} (a model) imports {target}")
            if unit == "transforms" and other in ("nn", "models"):
                bad.append(f"{path.relative_to(REPO)}:{line} (a transform) imports {target}")
    assert not bad, bad


def test_no_function_level_imports_outside_the_cli():
    lazy = [f"{path.relative_to(REPO)}:{line}" for module, path in _sources().items()
            if _unit(module) != "cli" for _, line, inner in _imports(path) if inner]
    assert not lazy, lazy


def test_no_import_cycles_between_modules():
    sources = _sources()
    graph = {m: {t for t, _, _ in _imports(p)} & set(sources) for m, p in sources.items()}
    # a package importing its own submodules (re-exports) is not a cycle of design
    graph = {m: {t for t in ts if not t.startswith(m + ".") and t != m}
             for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def dfs(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail
                             else [node, nxt])
                return True
            if nxt not in state and dfs(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    assert not any(dfs(m, []) for m in sorted(graph) if m not in state), cycle


def test_every_language_model_family_follows_the_model_protocol():
    from flax import nnx

    from sparsejax.models import GPT, LanguageModel, Llama

    for family in (GPT, Llama):
        model = family(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8,
                       rngs=nnx.Rngs(params=0))
        assert isinstance(model, LanguageModel), family.__name__
