"""Post-training pruning of a trained run with calibration data (``sparsejax prune``).

The methods (magnitude, Wanda, SparseGPT, DSF) are registered ``prune`` transforms, one
file each under ``sparsejax/transforms/prune/``; :func:`prune_layer` calls one on a bare
weight. This module runs them on a model:

1. **Calibration.** ``--calib-batches`` batches of the run's training stream (the first
   ones of seed ``calib_seed``) go through the model in inference form; for a layer the
   pass records ``H = X^T X`` (float32 sums over every token, ``(in, in)``) of the input
   its weight multiplies. ``||X_j||_2 = sqrt(H_jj)`` (Wanda) comes from the same sums.
2. **Sequential pruning** (the default, SparseGPT's scheme made exact per layer): the
   layers are visited in the order the forward calls them; each one's ``H`` is recorded
   with every earlier layer already pruned, so later layers are calibrated on the inputs
   they will see. ``sequential=False`` records every ``H`` in one pass of the dense model
   (faster: one pass instead of one per layer; the errors of earlier layers are then not
   compensated).
3. The new run directory (:func:`prune_run`) holds the pruned model as step 0 and a
   config whose first rule is the ``prune`` block, so ``load_model``, ``compare``,
   ``evaluate-analog`` and ``train.init_from`` (which carries the masks into masked
   fine-tuning) read it like any run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.calibration import (
    calibration_batches,
    call_order,
    input_grams,
    text_calibration_batches,
)
from sparsejax.config import RuleConfig, validate
from sparsejax.errors import ConfigError, PruneError
from sparsejax.evaluation import evaluate_model
from sparsejax.nn import Linear, named_layers, transform_slots
from sparsejax.runs import init_model, load_model, resolve_checkpoint, write_step_zero_run
from sparsejax.sample import source_tokenizer
from sparsejax.sparsity import check_nm
from sparsejax.transforms import GramCalibration, build_spec, methods
from sparsejax.transforms.prune import PruneResult, weighted_error

__all__ = ["LayerReport", "PruneError", "PruneResult", "parse_nm", "prune_layer", "prune_model",
           "prune_run"]

# Config keys of the prune rule -> the command's flags, for error messages.
_FLAGS = {"'rules.0.prune.sparsity'": "'--sparsity'", "'rules.0.prune.n'": "'--nm'",
          "'rules.0.prune.m'": "'--nm'", "'rules.0.path'": "'--layers'",
          "'rules.0.prune.method'": "'--method'", "'rules.0.prune.": "'--option "}


def prune_layer(method: str, w: jax.Array, h: jax.Array, *, sparsity: float | None = None,
                n: int | None = None, m: int | None = None, **options: Any) -> PruneResult:
    """Prune one weight ``w`` ``(in, out)`` (contracting axis 0) with ``method``
    (``magnitude | wanda | sparsegpt | dsf``) given ``h = X^T X`` ``(in, in)`` of its
    calibration inputs: unstructured at ``sparsity`` or ``n:m`` along the inputs.
    ``options``: the method's other fields (``blocksize``, ``rounds``, ...). Raises
    ``ValueError`` (a :class:`~sparsejax.transforms.SpecError` naming the field, or
    :class:`PruneError`) for bad input."""
    fields: dict[str, Any] = {"method": method, **options}
    if sparsity is not None:
        fields["sparsity"] = sparsity
    if n is not None or m is not None:
        fields["n"], fields["m"] = n or 0, m or 0
    spec = build_spec("prune", fields)
    w, h = jnp.asarray(w), jnp.asarray(h)
    if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"w must be (in, out) and h (in, in); got w {tuple(w.shape)}, "
                         f"h {tuple(h.shape)}")
    if spec.n:
        check_nm(w.shape, spec.n, spec.m, axis=0)
    return spec.prune(w, h)


# --------------------------------------------------------------------------- calibration


# --------------------------------------------------------------------------- a model


@dataclass
class LayerReport:
    """One pruned layer: ``rel_error`` = ``||X W - X W^||^2 / ||X W||^2`` on the
    calibration inputs it was pruned with; ``density`` = stored non-zeros / (in * out)."""

    path: str
    method: str
    pattern: str
    shape: tuple[int, int]
    density: float
    rel_error: float
    seconds: float


def prune_model(model: nnx.Module, batches: Sequence[np.ndarray], *, sequential: bool = True,
                progress: Callable[[str], None] | None = None) -> list[LayerReport]:
    """Calibrate and prune, in place, every layer of ``model`` that carries a calibrated
    transform (a ``prune`` rule), from the calibration inputs ``batches``; returns one
    report per layer in call order. Raises :class:`PruneError` naming the layer."""
    targets = {path: (layer, slot) for path, layer, _, slot in transform_slots(model)
               if isinstance(slot.spec, GramCalibration)}
    if not targets:
        raise PruneError("no layer carries a prune transform")
    order = [p for p in call_order(model, batches[0]) if p in targets]
    missing = sorted(set(targets) - set(order))
    if missing:
        raise PruneError(f"{missing[0]} is never called by the model's forward")
    grams = {} if sequential else input_grams(model, batches, order)
    reports = []
    for path in order:
        layer, slot = targets[path]
        h = input_grams(model, batches, [path])[path] if sequential else grams[path]
        start = time.perf_counter()
        w = layer.kernel[...]
        try:
            new = slot.spec.calibrate(slot.site, slot.view(w), h)
        except PruneError as err:
            raise PruneError(f"layer {path}: {err}") from None
        layer.kernel[...] = new.x
        slot.set_view(new)
        w_hat = layer.effective_kernel()
        jax.block_until_ready(w_hat)
        seconds = time.perf_counter() - start
        base = float(weighted_error(w, jnp.zeros_like(w), h))
        reports.append(LayerReport(
            path, slot.spec.method, slot.spec.pattern, tuple(w.shape),
            slot.spec.stored_density(slot.view(new.x)),
            float(weighted_error(w, w_hat, h)) / max(base, 1e-30), seconds))
        if progress:
            r = reports[-1]
            progress(f"  {path:24s} {r.method} {r.pattern}: density {r.density:.3f}, "
                     f"relative output error {r.rel_error:.4f} ({r.seconds:.1f} s)")
    return reports


# --------------------------------------------------------------------------- a run


def _prune_rule(method: str, layers: str, sparsity: float | None,
                nm: tuple[int, int] | None, options: dict[str, Any]) -> RuleConfig:
    block: dict[str, Any] = {"method": method, **options}
    if nm is not None:
        block["n"], block["m"] = nm
    elif sparsity is not None:
        block["sparsity"] = sparsity
    return RuleConfig(path=layers, prune=block)


def _copy_from_source(model: nnx.Module, source: nnx.Module, pruned: Sequence[str]) -> None:
    """Copy, in place, every variable of ``source`` into ``model`` at the same path with
    the same shape, except the transforms of the ``pruned`` layers, whose kernels become
    the source's inference weights (its old weight transforms folded in)."""
    stages = [f"{p}/{stage}/" for p in pruned for stage, _ in Linear.stages()]
    found = dict(jax.tree_util.tree_leaves_with_path(nnx.state(source)))
    target = nnx.state(model)
    values = []
    for path, value in jax.tree_util.tree_leaves_with_path(target):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        other = found.get(path)
        keep = (other is None or other.shape != value.shape or other.dtype != value.dtype
                or any(name.startswith(s) for s in stages))
        values.append(value if keep else other)
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(target), values))
    source_layers = dict(named_layers(source))
    for path, layer in named_layers(model):
        if path in pruned:
            layer.kernel[...] = source_layers[path].effective_kernel()


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; raises :class:`ConfigError`."""
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise ConfigError(f"--nm must be N:M such as 2:4, got {text!r}")
    return int(n), int(m)


def _overall_density(reports: Sequence[LayerReport]) -> float:
    """Stored non-zeros over the weights of every pruned layer."""
    kept = sum(r.density * math.prod(r.shape) for r in reports)
    return kept / sum(math.prod(r.shape) for r in reports)


def _check_prune_arguments(out: Path, method: str, sparsity: float | None,
                           nm: tuple[int, int] | None, calib_batches: int) -> None:
    """Raise :class:`ConfigError` naming the flag of a bad ``prune`` argument."""
    if method not in methods("prune"):
        raise ConfigError(f"--method '{method}' is not one of {'|'.join(methods('prune'))}")
    if (sparsity is None) == (nm is None):
        raise ConfigError("give one of --sparsity and --nm")
    if calib_batches < 1:
        raise ConfigError(f"--calib-batches must be >= 1, got {calib_batches}")
    if out.exists():
        raise ConfigError(f"--out {out} exists; choose a new directory")


def _pruned_config(cfg: Any, out: Path, rule: RuleConfig) -> Any:
    """The config of the pruned run: ``rule`` first, named after ``out``; a bad block is
    reported with the command's flags."""
    new_cfg = copy.deepcopy(cfg)
    new_cfg.rules = [rule, *cfg.rules]
    new_cfg.name, new_cfg.run_dir = out.name, str(out)
    new_cfg.train.init_from = None
    try:
        validate(new_cfg)  # builds the prune block's spec, which names a bad field
    except ConfigError as err:
        message = str(err)
        for key, flag in _FLAGS.items():
            message = message.replace(key, flag)
        raise ConfigError(message) from None
    return new_cfg


def prune_run(run_dir: str | Path, out: str | Path, *, method: str,
              sparsity: float | None = None, nm: tuple[int, int] | None = None,
              layers: str = ".*", calib_batches: int = 32, calib_seed: int | None = None,
              calib_data: str | Path | None = None, calib_seq_len: int | None = None,
              sequential: bool = True, step: int | None = None,
              options: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Prune the linear layers of the run ``run_dir`` (checkpoint ``step``, default the
    latest) that ``layers`` (a path regex) matches, with ``method`` at ``sparsity`` or
    the ``nm`` pattern, calibrated on ``calib_batches`` training batches (or, with
    ``calib_data``, batches of ``calib_seq_len``-token sequences of that text file: an HF
    source has no training stream); write the
    pruned model as a new run directory ``out`` and return the report (also in
    ``out/prune.json``): validation metrics before and after, one entry per layer.

    Raises :class:`ConfigError` (one line, nothing written) for a bad method, pattern,
    sparsity or regex, a run without checkpoints, an existing ``out``, or a layer that
    cannot be pruned (e.g. a singular calibration matrix)."""
    out = Path(out)
    _check_prune_arguments(out, method, sparsity, nm, calib_batches)
    source_dir, step = resolve_checkpoint(run_dir, step)
    source, cfg, step = load_model(source_dir, step)
    new_cfg = _pruned_config(cfg, out, _prune_rule(method, layers, sparsity, nm, options or {}))
    try:
        model = init_model(new_cfg, load_init=False)
    except ConfigError as err:
        raise ConfigError(f"{err} (--layers '{layers}', --nm/--sparsity)") from None
    pruned = [path for path, _, _, slot in transform_slots(model)
              if isinstance(slot.spec, GramCalibration)]
    _copy_from_source(model, source, pruned)
    say = progress or (lambda _: None)
    say(f"pruning {len(pruned)} layers of {source_dir} (step {step}) with {method} "
        f"{f'{nm[0]}:{nm[1]}' if nm else f'{sparsity:.0%}'}; calibration: {calib_batches} "
        f"batches{'' if calib_seed is None else f' of seed {calib_seed}'}, "
        f"{'sequential' if sequential else 'all layers from the dense model'}")
    before = evaluate_model(source, cfg)
    batches = (calibration_batches(cfg, calib_batches, calib_seed) if calib_data is None
               else text_calibration_batches(Path(calib_data), source_tokenizer(source_dir, cfg),
                                             calib_seq_len or cfg.model.block_size,
                                             cfg.data.batch_size, calib_batches))
    start = time.perf_counter()
    try:
        reports = prune_model(model, batches, sequential=sequential, progress=progress)
    except PruneError as err:
        raise ConfigError(str(err)) from None
    seconds = time.perf_counter() - start
    after = evaluate_model(model, new_cfg)
    report = {"source": str(source_dir), "source_step": step, "method": method,
              "pattern": reports[0].pattern, "layers": layers,
              "calib_batches": calib_batches, "calib_seed": calib_seed,
              "sequential": sequential, "prune_seconds": seconds,
              "density": _overall_density(reports), "before": before, "after": after,
              "per_layer": [asdict(r) for r in reports]}
    write_step_zero_run(out, new_cfg, model, "prune.json", report, "pruning")
    return report


