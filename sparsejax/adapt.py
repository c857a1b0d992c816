"""Adapting a trained softmax model to a new attention method at the start of a run whose
``train.init_from`` is the trained (teacher) model: the statistics-matching
initialisation of gain-cell attention (Leroux, Manea et al. 2025, "adaptation") and the
ASVD initialisation of CSKV's low-rank key / value projections.

1. For methods that match the teacher's outputs (gain-cell), the teacher (the
   ``init_from`` model as trained) runs on calibration batches and the per-head mean and
   standard deviation of each attention module's output are recorded; CSKV needs no
   teacher pass.
2. Layer by layer in call order, the student's queries, keys and values at that layer -
   with every earlier layer already calibrated - go to the layer's transform
   (:meth:`~sparsejax.transforms.Transform.calibrate`) with the teacher's statistics,
   the mean ``|x|`` per channel of the module input and the module's key / value
   projections; gain-cell attention sets its affines so that its statistics match,
   CSKV its ASVD factors.

Deviation: the reference code (``utils/llms_training_utils.py``, ``calibration_algorithm``)
matches statistics by damped fixed-point iterations over all layers at once (up to 100
forward passes); here each layer is solved in closed form on the inputs that reach it,
one forward pass per layer, which reaches the same fixed point for the output affine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.calibration import (
    attention_calls,
    attention_outputs,
    calibration_batches,
    call_order,
)
from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.nn import Attention, named_layers, transform_slots
from sparsejax.transforms import AttentionCalibration, AttentionData, head_statistics

__all__ = ["AttentionReport", "calibrate_attention", "calibrate_from_teacher",
           "output_statistics", "uncalibrated_attention"]


@dataclass
class AttentionReport:
    """One calibrated attention module: the teacher's per-head output mean / std and the
    student's after calibration, on the calibration batches."""

    path: str
    target_mean: np.ndarray
    target_std: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def max_rel_error(self) -> float:
        """The largest ``|student - teacher| / teacher std`` over heads and statistics."""
        scale = np.maximum(self.target_std, 1e-12)
        return float(max(np.max(np.abs(self.mean - self.target_mean) / scale),
                         np.max(np.abs(self.std - self.target_std) / scale)))


def uncalibrated_attention(model: nnx.Module) -> list[str]:
    """Paths of the attention modules whose transform calibrates from a trained model
    (:class:`~sparsejax.transforms.AttentionCalibration`), asks for calibration batches
    and has not been calibrated."""
    return [path for path, layer, _, slot in transform_slots(model)
            if isinstance(layer, Attention) and isinstance(slot.spec, AttentionCalibration)
            and slot.spec.calibration_batches() > 0
            and not slot.spec.is_calibrated(slot.view(None).state)]


def output_statistics(model: nnx.Module, batches: Sequence[np.ndarray]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{path: (mean, std)}``, per head ``(H,)``, of each attention module's output."""
    return {path: tuple(np.asarray(s) for s in head_statistics(arrays[3]))
            for path, arrays in attention_outputs(model, batches).items()}


def _calibrate_module(model: nnx.Module, layer: Attention, path: str,
                      batches: Sequence[np.ndarray],
                      target: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Calibrate, in place, the transform of the attention module ``layer`` at ``path``
    on the inputs that reach it now (``target``: the teacher's per-head output mean and
    std, for methods that match them)."""
    q, k, v, _, x = attention_outputs(model, batches, path)[path]
    slot = layer.attention_slot
    data = AttentionData(
        q=q, k=k, v=v, positions=jnp.arange(np.asarray(batches[0]).shape[-1]),
        x_abs_mean=jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=(0, 1)),
        kv_projection=layer.kv_projection(),
        target_mean=None if target is None else jnp.asarray(target[0]),
        target_std=None if target is None else jnp.asarray(target[1]))
    slot.set_view(slot.spec.calibrate(slot.site, slot.view(None), data))


def calibrate_attention(model: nnx.Module, teacher: nnx.Module,
                        batches: Sequence[np.ndarray],
                        progress: Callable[[str], None] | None = None) -> list[AttentionReport]:
    """Calibrate, in place and in call order, every attention module of ``model`` whose
    transform is uncalibrated (:func:`uncalibrated_attention`). Transforms that match the
    teacher's outputs (``matches_teacher_outputs``, gain-cell) get the per-head output
    statistics of the same module of ``teacher`` on ``batches`` and are reported; the
    teacher runs only when one of them is present. Raises ``ValueError`` when the teacher
    has no attention module at such a path."""
    wanted = set(uncalibrated_attention(model))
    if not wanted:
        return []
    layers = dict(named_layers(model, (Attention,)))
    matching = {p for p in wanted if layers[p].attention_slot.spec.matches_teacher_outputs}
    targets = output_statistics(teacher, batches) if matching else {}
    missing = sorted(matching - set(targets))
    if missing:
        raise ValueError(f"the teacher has no attention module at {missing[0]}")
    order = [path for path in call_order(model, batches[0], attention_calls)
             if path in wanted]
    reports = []
    for path in order:
        _calibrate_module(model, layers[path], path, batches, targets.get(path))
        if path not in matching:
            if progress:
                progress(f"{path}: calibrated ({layers[path].attention_slot.spec.method})")
            continue
        got = head_statistics(attention_outputs(model, batches, path)[path][3])  # y
        reports.append(AttentionReport(path, *(np.asarray(t) for t in targets[path]),
                                       *(np.asarray(s) for s in got)))
        if progress:
            progress(f"{path}: output statistics matched to "
                     f"{reports[-1].max_rel_error:.1e} of the teacher's std")
    model.train()
    return reports


def calibrate_from_teacher(cfg: Config, model: nnx.Module, teacher: nnx.Module,
                           verbose: bool = False) -> None:
    """Calibrate, in place, the attention transforms that start from a trained model
    (gain-cell attention's affines, CSKV's ASVD factors; ``sparsejax.adapt``) against
    ``teacher`` (the ``train.init_from`` model, :func:`init_model_with_source`), on the
    first training batches of the run (``calibration_batches()`` of the transform, the
    largest asked), as a fresh run does before its first step."""
    paths = uncalibrated_attention(model)
    if not paths:
        return
    count = max(slot.spec.calibration_batches() for path, _, _, slot in transform_slots(model)
                if path in paths)
    start = time.perf_counter()
    try:
        reports = calibrate_attention(model, teacher, calibration_batches(cfg, count))
    except ValueError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if verbose:
        matched = (f" (per-head output mean and std of {len(reports)} within "
                   f"{max(r.max_rel_error for r in reports):.1e} of the teacher's std)"
                   if reports else "")
        print(f"calibrated {len(paths)} attention modules from {cfg.train.init_from} "
              f"on {count} batches in {time.perf_counter() - start:.1f} s{matched}")
