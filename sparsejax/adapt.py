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

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.nn import Attention, named_layers, tap_attention, transform_slots
from sparsejax.posttrain import call_order
from sparsejax.transforms.attention.gaincell import head_statistics

__all__ = ["AttentionReport", "attention_outputs", "calibrate_attention",
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
    """Paths of the attention modules whose calibrated transform has not been calibrated
    and asks for calibration (``calib_batches > 0``)."""
    return [path for path, layer, _, slot in transform_slots(model)
            if isinstance(layer, Attention) and slot.spec.calibrated
            and getattr(slot.spec, "calib_batches", 0) > 0
            and not bool(slot.state["calibrated"][...])]


def _attention_calls(model: nnx.Module, x: jax.Array) -> list[tuple]:
    """``(path, q, k, v, y, x)`` of every attention call of ``model(x)``, in call order."""
    paths = {id(layer): path for path, layer in named_layers(model, (Attention,))}
    calls: list = []
    with tap_attention(lambda layer, q, k, v, y, x: calls.append((paths[id(layer)], q, k, v,
                                                                    y, x))):
        model(x)
    return calls


@functools.lru_cache(maxsize=64)
def _tap_function(graphdef: nnx.GraphDef, wanted: str | None) -> Callable:
    """The jitted ``(state, ids) -> {path: (q, k, v, y, x)}`` of the attention calls
    (only ``wanted`` when set), cached per model structure."""

    @jax.jit
    def taps(state, ids):
        return {path: (q, k, v, y, x) for path, q, k, v, y, x in
                _attention_calls(nnx.merge(graphdef, state), ids)
                if wanted is None or path == wanted}

    return taps


def attention_outputs(model: nnx.Module, batches: Sequence[np.ndarray],
                      path: str | None = None) -> dict[str, tuple[jax.Array, ...]]:
    """``{path: (q, k, v, y, x)}`` over the ``batches`` concatenated - ``q, k, v, y``
    ``(N, T, H, D)`` and the module input ``x`` ``(N, T, C)`` - of every attention module
    (or only ``path``) of ``model`` in inference form."""
    model.eval()
    graphdef, state = nnx.split(model)
    taps = _tap_function(graphdef, path)
    parts: dict[str, list] = {}
    for x in batches:
        for name, arrays in taps(state, jnp.asarray(x)).items():
            parts.setdefault(name, []).append(arrays)
    return {name: tuple(jnp.concatenate(a, axis=0) for a in zip(*chunks, strict=True))
            for name, chunks in parts.items()}


def output_statistics(model: nnx.Module, batches: Sequence[np.ndarray]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{path: (mean, std)}``, per head ``(H,)``, of each attention module's output."""
    return {path: tuple(np.asarray(s) for s in head_statistics(arrays[3]))
            for path, arrays in attention_outputs(model, batches).items()}


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
    slots = {path: slot for path, _, _, slot in transform_slots(model) if path in wanted}
    matching = {path for path in wanted if slots[path].spec.matches_teacher_outputs}
    targets = output_statistics(teacher, batches) if matching else {}
    missing = sorted(matching - set(targets))
    if missing:
        raise ValueError(f"the teacher has no attention module at {missing[0]}")
    layers = dict(named_layers(model, (Attention,)))
    order = [path for path in call_order(model, batches[0], _attention_calls)
             if path in wanted]
    positions = jnp.arange(np.asarray(batches[0]).shape[-1])
    reports = []
    for path in order:
        q, k, v, _, x = attention_outputs(model, batches, path)[path]
        slot = slots[path]
        data = {"q": q, "k": k, "v": v, "positions": positions,
                "x_abs_mean": jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=(0, 1)),
                "kv_projection": layers[path].kv_projection()}
        if path in matching:
            data["target_mean"], data["target_std"] = (jnp.asarray(t) for t in targets[path])
        new = slot.spec.calibrate(slot.site, slot.view(None), data)
        for name, value in new.params.items():
            slot.params[name][...] = value
        for name, value in new.state.items():
            slot.state[name][...] = value
        if path not in matching:
            if progress:
                progress(f"{path}: calibrated ({slot.spec.method})")
            continue
        got = head_statistics(attention_outputs(model, batches, path)[path][3])  # y
        reports.append(AttentionReport(path, *(np.asarray(t) for t in targets[path]),
                                       *(np.asarray(s) for s in got)))
        if progress:
            progress(f"{path}: output statistics matched to "
                     f"{reports[-1].max_rel_error:.1e} of the teacher's std")
    model.train()
    return reports
