"""Compare checkpoints layer by layer - in TensorBoard, in the terminal, in a notebook.

``compare_checkpoints([A, B, ...])`` restores each checkpoint (a run directory - latest
checkpoint, or ``step`` - or a checkpoint directory ``<run>/checkpoints/<step>``), lines up
the linear layers the models share (same path, same kernel shape; different methods and
configs are fine: dense vs S-STE vs DAT) and measures, per layer and checkpoint, against
the first checkpoint:

* ``rel_distance`` ``||W - W_ref|| / ||W_ref||`` and ``cosine`` similarity of the
  effective weights (what each model multiplies by: masked, scaled, quantised);
* ``sparsity``: realised fraction of zeros of the effective weight;
* ``mask_overlap`` (intersection over union of the non-zero patterns) and
  ``mask_hamming`` (fraction of entries whose zero/non-zero state differs), when both
  layers are sparse;
* ``quant_mse``: the weight quantisation error, for quantised layers.

With ``logdir``, every checkpoint becomes one TensorBoard run under ``logdir/name/``:
scalars ``compare/<path>/<metric>`` at the checkpoint's training step, weight histograms
``weights/<path>``, images ``pattern/<path>`` of the effective non-zero pattern of a
64x64 tile of each sparse layer, and a text summary table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsejax.config import CheckpointError, ConfigError
from sparsejax.nn import named_layers, sparse_layers

__all__ = ["CompareError", "Loaded", "compare_checkpoints", "format_rows", "load_checkpoint"]

METRICS = ("rel_distance", "cosine", "sparsity", "mask_overlap", "mask_hamming", "quant_mse")
TILE = 64


class CompareError(CheckpointError):
    """A checkpoint that cannot be found or read; the message is one line."""


@dataclass
class Loaded:
    """One restored checkpoint: its label, training step and effective weights by path."""

    label: str
    step: int
    weights: dict[str, np.ndarray]  # effective kernels (in, out), float32
    sparse: set[str]  # paths of N:M sparse layers
    quant_mse: dict[str, float]  # weight quantisation MSE of quantised layers


def load_checkpoint(path: str | Path, step: int | None = None) -> Loaded:
    """Restore a run directory (latest checkpoint, or ``step``) or a checkpoint directory
    ``<run>/checkpoints/<step>``. Raises :class:`CompareError` (one line)."""
    from sparsejax.train import load_model, resolve_checkpoint

    run_dir, step = resolve_checkpoint(path, step)
    try:
        model, cfg, step = load_model(run_dir, step)
    except ConfigError as err:
        raise CompareError(str(err)) from None
    weights, quant_mse = {}, {}
    sparse = {path for path, _ in sparse_layers(model)}
    for layer_path, layer in named_layers(model):
        w, metrics = layer.effective_kernel_with_metrics()
        weights[layer_path] = np.asarray(w, np.float32)
        if "mse" in metrics.get("weight_quant", {}):
            quant_mse[layer_path] = float(metrics["weight_quant"]["mse"])
    label = f"{cfg.name}@{step}"
    return Loaded(label, step, weights, sparse, quant_mse)


def _layer_metrics(ref: Loaded, other: Loaded, path: str) -> dict[str, float]:
    w0, w = ref.weights[path].ravel(), other.weights[path].ravel()
    norm0 = float(np.linalg.norm(w0))
    norms = norm0 * float(np.linalg.norm(w))
    out = {"rel_distance": float(np.linalg.norm(w - w0)) / norm0 if norm0 else math.nan,
           "cosine": float(np.dot(w, w0)) / norms if norms else math.nan,
           "sparsity": float(np.mean(w == 0))}
    if path in ref.sparse and path in other.sparse:
        m0, m = w0 != 0, w != 0
        union = int(np.sum(m0 | m))
        out["mask_overlap"] = int(np.sum(m0 & m)) / union if union else 1.0
        out["mask_hamming"] = float(np.mean(m0 != m))
    if path in other.quant_mse:
        out["quant_mse"] = other.quant_mse[path]
    return out


def compare_checkpoints(paths: list[str | Path], step: int | None = None,
                        logdir: str | Path | None = None, name: str | None = None
                        ) -> list[dict[str, Any]]:
    """Compare checkpoints against the first; returns one row per (checkpoint, shared
    layer): ``{"checkpoint", "step", "layer", <metrics>}`` and, as the last rows, the
    layers not shared by all (``{"checkpoint", "layer", "note"}``). Writes TensorBoard
    runs under ``logdir/name`` when ``logdir`` is given."""
    if len(paths) < 2:
        raise CompareError("compare needs at least two checkpoints")
    loaded = [load_checkpoint(p, step) for p in paths]
    seen: dict[str, int] = {}
    for item in loaded:  # unique labels (the same run at two steps, two copies of a run)
        count = seen.get(item.label, 0)
        seen[item.label] = count + 1
        if count:
            item.label = f"{item.label}#{count + 1}"
    ref = loaded[0]
    shared = [p for p in ref.weights
              if all(p in c.weights and c.weights[p].shape == ref.weights[p].shape
                     for c in loaded)]
    rows: list[dict[str, Any]] = []
    for item in loaded:
        for path in shared:
            rows.append({"checkpoint": item.label, "step": item.step, "layer": path,
                         **_layer_metrics(ref, item, path)})
    for item in loaded:
        for path in sorted(set(item.weights) - set(shared)):
            rows.append({"checkpoint": item.label, "layer": path,
                         "note": "not in every checkpoint (or different shape)"})
    if logdir is not None:
        _write_tensorboard(Path(logdir) / (name or "compare"), loaded, shared, rows)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The comparison as a plain-text table (one line per checkpoint and layer)."""
    cols = ["checkpoint", "layer", *METRICS]
    table = [[str(c) for c in cols]]
    for row in rows:
        if "note" in row:
            table.append([row["checkpoint"], row["layer"], row["note"]] + [""] * (len(cols) - 3))
            continue
        table.append([row["checkpoint"], row["layer"]] + [
            "-" if row.get(m) is None else f"{row[m]:.4g}" for m in METRICS])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pattern_image(w: np.ndarray) -> np.ndarray:
    """Non-zero pattern of the top-left ``TILE x TILE`` tile as an ``(1, h, w)`` image
    (white = kept), rows = input features (the N:M grouping axis)."""
    tile = (w[:TILE, :TILE] != 0).astype(np.float32)
    return tile[None]


def _write_tensorboard(root: Path, loaded: list[Loaded], shared: list[str],
                       rows: list[dict[str, Any]]) -> None:
    from tensorboardX import SummaryWriter

    summary = format_rows(rows)
    for item in loaded:
        writer = SummaryWriter(str(root / item.label.replace("/", "_")))
        try:
            for row in rows:
                if row["checkpoint"] != item.label or "note" in row:
                    continue
                for metric in METRICS:
                    if row.get(metric) is not None:
                        writer.add_scalar(f"compare/{row['layer']}/{metric}", row[metric],
                                          item.step)
            for path in shared:
                writer.add_histogram(f"weights/{path}", item.weights[path], item.step)
                if path in item.sparse:
                    writer.add_image(f"pattern/{path}", _pattern_image(item.weights[path]),
                                     item.step, dataformats="CHW")
            writer.add_text("summary", "    " + summary.replace("\n", "\n    "), item.step)
        finally:
            writer.close()
