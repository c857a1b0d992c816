"""Compare runs layer by layer over training - in TensorBoard, in the terminal, in a notebook.

``compare_checkpoints([A, B, ...])`` compares every later run with the first: one *pair*
``B vs A`` per later argument. Each argument is a run directory or a checkpoint directory
``<run>/checkpoints/<step>``. Run directories are compared at every checkpoint step they
all share (or at ``steps``), so the metrics become curves over training; checkpoint
directories (or runs that share no step) give one point per pair. The linear layers the
models share (same path, same kernel shape) are lined up; methods and configs may differ
(dense vs S-STE vs DAT). Per pair, step and layer:

* ``rel_distance`` ``||W_B - W_A|| / ||W_A||`` and ``cosine`` similarity of the effective
  weights (what each model multiplies by: masked, scaled, quantised);
* ``mask_overlap``: intersection over union of the non-zero patterns when both layers
  are sparse, next to ``random_overlap``, the IoU two independent random masks of the
  same densities have (:func:`random_mask_overlap`; 1/3 for two 2:4 masks), so a
  measured overlap can be judged;
* ``sparsity_a`` / ``sparsity_b`` (realised fraction of zeros) and ``quant_mse_a`` /
  ``quant_mse_b`` (weight quantisation error of quantised layers).

With ``logdir``, each pair becomes one TensorBoard run ``logdir/name/b(<B>)_vs_a(<A>)``,
named by the setting that distinguishes the runs:

* scalars ``<metric>/<layer>`` at every compared step (series that do not change over the
  compared steps - a 2:4 layer's sparsity - are left to the table), ``mean/<metric>``
  over layers, and a custom-scalars layout with one chart per metric, all layers in it;
* images ``overview/<metric>``: a layers x steps heat map per metric;
  ``pattern/<layer>``: an enlarged tile of each sparse layer's masks with the N:M group
  grid drawn, coloured kept-in-both / only-A / only-B / pruned-in-both
  (:func:`mask_difference_image`), at each compared step;
* histograms ``nonzero_weights/<layer>/{a,b}`` of the non-zero weights on one bin range per
  layer and step (the pruned zeros are the ``sparsity`` column);
* text ``summary``: the config difference, then a layers x metrics table (markdown);
* hparams: the differing settings as ``a.<key>`` / ``b.<key>`` columns (flattened keys,
  ``rules.0.sparsity.method``), the mean metrics and each run's final validation metrics.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsejax.checkpoint import Checkpointer
from sparsejax.config import Config, to_flat_dict
from sparsejax.errors import CompareError, ConfigError
from sparsejax.nn import named_layers
from sparsejax.runs import load_model, resolve_checkpoint

__all__ = ["Comparison", "CompareError", "Loaded", "Pair", "compare_checkpoints",
           "format_rows", "layer_metrics", "load_checkpoint", "markdown_summary",
           "mask_difference_image", "overview_figure", "pattern_tile", "random_mask_overlap"]

# B-vs-A metrics: always drawn. Per-run state: drawn over training only where it changes.
PAIR_METRICS = ("rel_distance", "cosine", "mask_overlap")
STATE_METRICS = ("random_overlap", "sparsity_a", "sparsity_b", "quant_mse_a", "quant_mse_b")
METRICS = PAIR_METRICS + STATE_METRICS
# Settings that name a run rather than configure it: never "the difference".
IDENTITY_KEYS = frozenset({"name", "run_dir"})
MARKER = ".sparsejax-compare"  # marks a directory this command wrote (and may replace)

# Pattern tiles: the first TILE_OUT outputs x TILE_IN inputs, CELL pixels per weight
# (CELL - 1 of colour and a one-pixel grid line), a legend strip below.
TILE_OUT, TILE_IN, CELL = 32, 64, 8
KEPT_BOTH = (40, 40, 40)
ONLY_A = (0, 114, 178)  # blue
ONLY_B = (230, 120, 0)  # orange
PRUNED_BOTH = (255, 255, 255)
PATTERN_COLOURS = {"kept in both": KEPT_BOTH, "only A": ONLY_A, "only B": ONLY_B,
                   "pruned in both": PRUNED_BOTH}
CELL_LINE, GROUP_LINE, LEGEND_BACKGROUND = (205, 205, 205), (0, 0, 0), (236, 236, 236)
SWATCH, LEGEND_HEIGHT = 12, 24


@dataclass
class Loaded:
    """One restored checkpoint: its run, training step, config and effective weights."""

    run_dir: Path
    step: int
    cfg: Config
    weights: dict[str, np.ndarray]  # effective kernels (in, out), float32
    groups: dict[str, int | None]  # sparse layers -> N:M group length (None: unstructured)
    quant_mse: dict[str, float]  # weight quantisation MSE of quantised layers

    @property
    def sparse(self) -> set[str]:
        return set(self.groups)


@dataclass
class Pair:
    """``B vs A``: what distinguishes the runs, and where TensorBoard shows the pair."""

    name: str  # TensorBoard run name, e.g. "b(ste)_vs_a(sste)"
    label_a: str
    label_b: str
    run_a: Path
    run_b: Path
    diff: dict[str, tuple[Any, Any]]  # differing settings: key -> (A's value, B's value)
    final: dict[str, float] = field(default_factory=dict)  # "a/val_loss", ... (results.json)
    settings: tuple[dict[str, Any], dict[str, Any]] = field(default_factory=lambda: ({}, {}),
                                                            repr=False)  # flat configs


@dataclass
class Comparison:
    """The result of :func:`compare_checkpoints`.

    ``rows``: one dict per (pair, step, layer) ``{"pair", "step", "step_a", "step_b",
    "layer", <metrics>}``, then the layers not shared by every checkpoint
    (``{"pair", "layer", "note"}``). ``logdir``: the TensorBoard directory written, if any.
    """

    pairs: list[Pair]
    rows: list[dict[str, Any]]
    logdir: Path | None = None

    def __iter__(self):  # a Comparison reads like its rows
        return iter(self.rows)

    def steps(self, pair: Pair | str) -> list[int]:
        name = pair if isinstance(pair, str) else pair.name
        return sorted({r["step"] for r in self.rows if r["pair"] == name and "step" in r})

    def table(self, pair: Pair | str | None = None, step: int | None = None
              ) -> list[dict[str, Any]]:
        """The rows of one pair (default: the first) at one step (default: the last)."""
        pair = pair or self.pairs[0]
        name = pair if isinstance(pair, str) else pair.name
        step = self.steps(name)[-1] if step is None else step
        return [r for r in self.rows if r["pair"] == name and r.get("step") == step]

    def means(self, pair: Pair | str | None = None) -> list[dict[str, Any]]:
        """Per compared step, each metric's mean over the layers that have it (rows with
        ``layer`` "mean over layers")."""
        pair = pair or self.pairs[0]
        name = pair if isinstance(pair, str) else pair.name
        out = []
        for step in self.steps(name):
            rows = [r for r in self.rows if r["pair"] == name and r.get("step") == step]
            values = {m: [r[m] for r in rows if r.get(m) is not None] for m in METRICS}
            out.append({"pair": name, "step": step, "layer": "mean over layers",
                        **{m: float(np.mean(v)) for m, v in values.items() if v}})
        return out

    def markdown(self, pair: Pair | None = None) -> str:
        """:func:`markdown_summary` of a pair (default: the first)."""
        pair = pair or self.pairs[0]
        return markdown_summary(pair, [r for r in self.rows if r["pair"] == pair.name])

    def overview_figure(self, metric: str, pair: Pair | None = None):
        """:func:`overview_figure` of a pair (default: the first)."""
        pair = pair or self.pairs[0]
        return overview_figure([r for r in self.rows if r["pair"] == pair.name], metric,
                               f"{metric}: B = {pair.label_b} vs A = {pair.label_a}")


# --------------------------------------------------------------------------- metrics


def random_mask_overlap(density_a: float, density_b: float) -> float:
    """Expected intersection over union of two independent random masks keeping fractions
    ``density_a`` and ``density_b`` of the weights: ``da db / (da + db - da db)`` (the ratio
    of the expected intersection to the expected union - per N:M group too, where an
    independent uniform choice of ``n`` of ``m`` keeps each weight with probability
    ``n / m``: two 2:4 masks give 1/3). Two empty masks give 1."""
    union = density_a + density_b - density_a * density_b
    return density_a * density_b / union if union else 1.0


def layer_metrics(a: Loaded, b: Loaded, path: str) -> dict[str, float]:
    """The metrics of layer ``path`` of B against A (see the module docstring)."""
    wa, wb = a.weights[path].ravel(), b.weights[path].ravel()
    norm_a = float(np.linalg.norm(wa))
    norms = norm_a * float(np.linalg.norm(wb))
    out = {"rel_distance": float(np.linalg.norm(wb - wa)) / norm_a if norm_a else math.nan,
           "cosine": float(np.dot(wb, wa)) / norms if norms else math.nan,
           "sparsity_a": float(np.mean(wa == 0)), "sparsity_b": float(np.mean(wb == 0))}
    if path in a.sparse and path in b.sparse:
        ka, kb = wa != 0, wb != 0
        union = int(np.sum(ka | kb))
        out["mask_overlap"] = int(np.sum(ka & kb)) / union if union else 1.0
        out["random_overlap"] = random_mask_overlap(float(np.mean(ka)), float(np.mean(kb)))
    for suffix, run in (("a", a), ("b", b)):
        if path in run.quant_mse:
            out[f"quant_mse_{suffix}"] = run.quant_mse[path]
    return out


def mask_difference_image(kept_a: np.ndarray, kept_b: np.ndarray, group: int | None = None,
                          cell: int = CELL, legend: bool = True) -> np.ndarray:
    """An RGB ``uint8`` picture ``(H, W, 3)`` of where two masks agree.

    ``kept_a``, ``kept_b``: boolean ``(out, in)`` (one row per output, the N:M groups run
    along a row). Each weight is a ``(cell - 1)``-pixel square coloured by
    :data:`PATTERN_COLOURS` (kept in both, only A, only B, pruned in both), separated by
    one-pixel grid lines: black between groups of ``group`` inputs, light grey otherwise.
    ``legend`` adds a strip below with one ``SWATCH``-pixel square per colour and its name.
    """
    if kept_a.shape != kept_b.shape or kept_a.ndim != 2:
        raise ValueError(f"masks of shapes {kept_a.shape} and {kept_b.shape}: need two "
                         "equal (out, in) matrices")
    rows, cols = kept_a.shape
    codes = np.where(kept_a, np.where(kept_b, 0, 1), np.where(kept_b, 2, 3))
    palette = np.array(list(PATTERN_COLOURS.values()), np.uint8)
    height, width = rows * cell + 1, cols * cell + 1
    image = np.empty((height, width, 3), np.uint8)
    image[:] = CELL_LINE
    inner = np.repeat(np.repeat(palette[codes], cell - 1, axis=0), cell - 1, axis=1)
    inside_rows = np.flatnonzero(np.arange(height) % cell)  # every pixel but the lines
    inside_cols = np.flatnonzero(np.arange(width) % cell)
    image[np.ix_(inside_rows, inside_cols)] = inner
    if group:
        image[:, ::cell * group] = GROUP_LINE
        image[:, -1] = GROUP_LINE
    if not legend:
        return image
    from PIL import Image, ImageDraw

    strip = np.empty((LEGEND_HEIGHT, width, 3), np.uint8)
    strip[:] = LEGEND_BACKGROUND
    canvas = Image.fromarray(np.concatenate([image, strip]))
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # no anti-aliasing: text pixels are exactly black
    x, top = 4, height + (LEGEND_HEIGHT - SWATCH) // 2
    for name, colour in PATTERN_COLOURS.items():
        draw.rectangle([x, top, x + SWATCH - 1, top + SWATCH - 1], fill=colour)
        draw.text((x + SWATCH + 4, top), name, fill=GROUP_LINE)
        x += SWATCH + 8 + int(draw.textlength(name)) + 12
    return np.asarray(canvas)


def pattern_tile(a: Loaded, b: Loaded, path: str) -> np.ndarray:
    """:func:`mask_difference_image` of the top-left ``TILE_OUT x TILE_IN`` tile of layer
    ``path`` of two checkpoints (outputs as rows, the N:M groups along each row)."""
    wa = a.weights[path][:TILE_IN, :TILE_OUT].T
    wb = b.weights[path][:TILE_IN, :TILE_OUT].T
    group = a.groups.get(path) or b.groups.get(path)
    return mask_difference_image(wa != 0, wb != 0, group)


# --------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, step: int | None = None) -> Loaded:
    """Restore a run directory (latest checkpoint, or ``step``) or a checkpoint directory
    ``<run>/checkpoints/<step>``. Raises :class:`CompareError` (one line)."""
    run_dir, step = resolve_checkpoint(path, step)
    try:
        model, cfg, step = load_model(run_dir, step)
    except ConfigError as err:
        raise CompareError(str(err)) from None
    weights, groups, quant_mse = {}, {}, {}
    for layer_path, layer in named_layers(model):
        w, metrics = layer.effective_kernel_with_metrics()
        weights[layer_path] = np.asarray(w, np.float32)
        for _, slot in layer.slots():
            if slot.role == "weights" and slot.spec.produces_zeros:
                groups[layer_path] = slot.spec.mask_group
        if "mse" in metrics.get("weight_quant", {}):
            quant_mse[layer_path] = float(metrics["weight_quant"]["mse"])
    return Loaded(Path(run_dir), step, cfg, weights, groups, quant_mse)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    if not run_dir.exists():
        raise CompareError(f"checkpoint not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise CompareError(f"{run_dir} is not a run directory (no config.yaml)")
    if not (run_dir / "checkpoints").is_dir():
        return []
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _plan(paths: list[str | Path], steps: list[int] | None
          ) -> tuple[list[list[tuple[Path, int]]], str | None]:
    """The checkpoints to compare: a list of points, each ``[(run_dir, step)]`` per
    argument, and a note when the runs shared no step."""
    targets = [resolve_checkpoint(p) for p in paths]
    have = [_checkpoint_steps(run) for run, _ in targets]
    for (run, pinned), available in zip(targets, have, strict=True):
        for step in ([pinned] if pinned is not None else steps or []):
            if step not in available:
                raise CompareError(f"{run}: no checkpoint at step {step} (have {available})")
        if not available:
            raise CompareError(f"{run}: no checkpoint (have [])")
    if steps:
        pinned = [p for p, (_, s) in zip(paths, targets, strict=True) if s is not None]
        if pinned:
            raise CompareError(f"steps apply to run directories; {pinned[0]} is one "
                               "checkpoint (give its run directory)")
        return [[(run, s) for run, _ in targets] for s in steps], None
    note = None
    if all(s is None for _, s in targets):
        shared = sorted(set.intersection(*(set(h) for h in have)))
        if shared:
            return [[(run, s) for run, _ in targets] for s in shared], None
        note = "the runs share no checkpoint step: comparing the latest of each"
    return [[(run, s if s is not None else h[-1])
             for (run, s), h in zip(targets, have, strict=True)]], note


def _label(diff: dict[str, tuple[Any, Any]], side: int, cfg: Config, run: Path) -> str:
    """What distinguishes a run from the other: its transform methods where they differ
    (``ste``), else up to two other differing settings (``seed=1``), else its name."""
    def given(key: str) -> bool:
        return diff[key][side] not in (None, [], {})

    methods = [str(diff[k][side]) for k in diff if k.endswith(".method") and given(k)]
    others = [f"{k.rsplit('.', 1)[-1]}={diff[k][side]}" for k in diff
              if ".method" not in k and not k.startswith("rules") and given(k)]
    has_methods = any(k.endswith(".method") for k in diff)
    label = ",".join(methods if has_methods else others[:2]) or cfg.name or run.name
    return "".join(c if c.isalnum() or c in "._-,=+" else "_" for c in label)[:40]


def _make_pair(index: int, a: Loaded, b: Loaded) -> Pair:
    fa, fb = to_flat_dict(a.cfg), to_flat_dict(b.cfg)
    diff = {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
            if k not in IDENTITY_KEYS and fa.get(k) != fb.get(k)}
    label_a, label_b = _label(diff, 0, a.cfg, a.run_dir), _label(diff, 1, b.cfg, b.run_dir)
    if label_a == label_b and a.step != b.step:
        label_a, label_b = f"{label_a}@{a.step}", f"{label_b}@{b.step}"
    final = {}
    for side, run in (("a", a.run_dir), ("b", b.run_dir)):
        try:
            results = json.loads((run / "results.json").read_text())
        except (OSError, ValueError):
            continue
        final.update({f"{side}/{k}": float(v) for k, v in results.items()
                      if k.startswith("val_") and not k.endswith("_tokens")
                      and isinstance(v, (int, float))})
    letter = chr(ord("b") + index) if index < 25 else f"run{index + 1}"
    return Pair(f"{letter}({label_b})_vs_a({label_a})", label_a, label_b, a.run_dir,
                b.run_dir, diff, final, (fa, fb))


# --------------------------------------------------------------------------- comparison


def _compare_point(point: list[tuple[Path, int]], first: bool, pairs: list[Pair],
                   rows: list[dict[str, Any]], notes: list[dict[str, Any]], writers: list[Any],
                   partial: Path | None, progress: Any) -> None:
    """Restore the checkpoints of one step ``point`` (``[(run, step), ...]``), compare every
    later one with the first, append the rows (and, at the ``first`` point, the notes on
    layers not in both) and write the pair's TensorBoard step; opens a pair's writer the
    first time it is seen."""
    loaded = []
    for run, s in point:
        if progress:
            progress(f"restoring {run} at step {s}")
        loaded.append(load_checkpoint(run, s))
    a = loaded[0]
    for i, b in enumerate(loaded[1:]):
        if len(pairs) <= i:
            pairs.append(_make_pair(i, a, b))
            if partial is not None:
                writers.append(_open_writer(partial / pairs[i].name))
        shared = [p for p in a.weights
                  if p in b.weights and b.weights[p].shape == a.weights[p].shape]
        for path in shared:
            rows.append({"pair": pairs[i].name, "step": b.step, "step_a": a.step,
                         "step_b": b.step, "layer": path,
                         **layer_metrics(a, b, path)})
        if first:
            notes.extend({"pair": pairs[i].name, "layer": p,
                          "note": "not in both checkpoints (or of different shapes)"}
                         for p in sorted(a.weights.keys() ^ b.weights.keys()
                                         | a.weights.keys() - set(shared)))
        if writers:
            _write_step(writers[i], a, b, shared)


def compare_checkpoints(paths: list[str | Path], step: int | None = None,
                        logdir: str | Path | None = None, name: str | None = None,
                        steps: list[int] | None = None, progress=None) -> Comparison:
    """Compare every later checkpoint or run with the first (see the module docstring).

    ``steps`` (or one ``step``): the checkpoint steps to take from run directories;
    default: every step they all share. ``logdir``: write one TensorBoard run per pair
    under ``logdir/name`` (default name ``compare``). ``progress``: called with a message
    per restored checkpoint. Raises :class:`CompareError` (one line)."""
    if len(paths) < 2:
        raise CompareError("compare needs at least two checkpoints")
    if step is not None:
        steps = [step]
    points, note = _plan(list(paths), steps)
    if note and progress:
        progress(note)
    root = None if logdir is None else Path(logdir) / (name or "compare")
    partial = None if root is None else _prepare_logdir(root)
    pairs: list[Pair] = []
    rows: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    writers: list[Any] = []
    try:
        for point in points:
            _compare_point(point, point is points[0], pairs, rows, notes, writers, partial,
                           progress)
        result = Comparison(pairs, rows + notes, root)
        for pair, writer in zip(pairs, writers, strict=False):  # no writers: no logdir
            _write_summary(writer, pair, result, layout=writer is writers[0],
                           hparam_keys=sorted({k for p in pairs for k in p.diff}))
    except BaseException:
        for writer in writers:
            writer.close()
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    for writer in writers:
        writer.close()
    if partial is not None:
        _publish_logdir(partial, root)
    return result


# --------------------------------------------------------------------------- views


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _present(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    return [c for c in columns if any(r.get(c) is not None for r in rows)]


def format_rows(rows: list[dict[str, Any]] | Comparison) -> str:
    """The comparison as a plain-text table (one line per pair, step and layer; columns
    no row fills are left out)."""
    rows = list(rows)
    data = [r for r in rows if "note" not in r]
    cols = ["pair", "step", "layer", *_present(data, METRICS)]
    table = [cols] + [[_fmt(r.get(c)) for c in cols] for r in data]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    missing: dict[str, list[str]] = {}
    for r in rows:
        if "note" in r:
            missing.setdefault(r["pair"], []).append(r["layer"])
    lines += [f"{pair}: not in both checkpoints (or of different shapes): {', '.join(layers)}"
              for pair, layers in missing.items()]
    return "\n".join(lines)


COLUMN_TITLES = {"rel_distance": "rel. distance", "cosine": "cosine",
                 "mask_overlap": "mask IoU", "random_overlap": "random-mask IoU",
                 "sparsity_a": "sparsity A", "sparsity_b": "sparsity B",
                 "quant_mse_a": "quant MSE A", "quant_mse_b": "quant MSE B"}


def markdown_summary(pair: Pair, rows: list[dict[str, Any]]) -> str:
    """Markdown for TensorBoard's text dashboard (and notebooks): what B and A are, the
    settings that differ, and a layers x metrics table at the last compared step."""
    data = [r for r in rows if "note" not in r]
    steps = sorted({r["step"] for r in data})
    last = [r for r in data if r["step"] == steps[-1]] if steps else []
    lines = [f"## B = {pair.label_b} vs A = {pair.label_a}", "",
             f"B: `{pair.run_b}` · A: `{pair.run_a}` · compared at step"
             f"{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}", ""]
    if pair.diff:
        lines += ["| setting | A | B |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(va)} | {_fmt(vb)} |" for k, (va, vb) in pair.diff.items()]
    else:
        lines.append("The configs are the same (but for name and run_dir).")
    if pair.final:
        lines += ["", "Final validation metrics of the runs: " + ", ".join(
            f"{k} {v:.4g}" for k, v in sorted(pair.final.items()))]
    cols = _present(last, METRICS)
    lines += ["", f"### Layers at step {steps[-1] if steps else '-'}", "",
              "| layer | " + " | ".join(COLUMN_TITLES[c] for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    lines += [f"| `{r['layer']}` | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |"
              for r in last]
    missing = [r["layer"] for r in rows if "note" in r]
    if missing:
        lines += ["", "Not in both models (or of different shapes): " + ", ".join(missing)]
    if any(r.get("mask_overlap") is not None for r in last):
        lines += ["", "`pattern/<layer>` images: the first 32 outputs (rows) x 64 inputs of "
                  "each sparse layer, black lines between N:M groups; dark = kept in both, "
                  "blue = only in A, orange = only in B, white = pruned in both."]
    return "\n".join(lines)


def overview_figure(rows: list[dict[str, Any]], metric: str, title: str | None = None):
    """A matplotlib figure: ``metric`` of one pair as a layers x steps heat map, values
    written in the cells (when there are few), the random-mask IoU beside each layer for
    ``mask_overlap``."""
    from matplotlib.figure import Figure

    data = [r for r in rows if r.get(metric) is not None]
    layers = list(dict.fromkeys(r["layer"] for r in data))
    steps = sorted({r["step"] for r in data})
    grid = np.full((len(layers), len(steps)), np.nan)
    for r in data:
        grid[layers.index(r["layer"]), steps.index(r["step"])] = r[metric]
    labels = layers
    if metric == "mask_overlap":
        chance = {r["layer"]: r["random_overlap"] for r in data}
        labels = [f"{p}  (random {chance[p]:.2f})" for p in layers]
    fig = Figure(figsize=(3.2 + 0.75 * max(len(steps), 2) + 0.06 * max(map(len, labels)),
                          1.2 + 0.32 * len(layers)), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.05)
    ax.set_yticks(range(len(layers)), labels, fontsize=8)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
    ax.set_xlabel("training step")
    ax.set_title(title or metric, fontsize=9)
    if len(steps) <= 12 and len(layers) <= 40:
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                dark = hi == lo or (value - lo) / (hi - lo) < 0.6
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    fig.tight_layout()
    return fig


def _figure_pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------- TensorBoard


def _prepare_logdir(root: Path) -> Path:
    """The directory to write into: ``.<name>.partial`` beside ``root``, moved over
    ``root`` by :func:`_publish_logdir` once everything is written (so a failed run leaves
    an earlier comparison as it was). A ``root`` that holds anything this command did not
    write is refused."""
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise CompareError(f"{root} exists and was not written by sparsejax compare; "
                           "pass another --name or --logdir")
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / MARKER).write_text("written by sparsejax compare; replaced when it runs again\n")
    return partial


def _publish_logdir(partial: Path, root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)


def _open_writer(run: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run))


def _write_histogram(writer, tag: str, values: np.ndarray, edges: np.ndarray,
                     step: int) -> None:
    counts, _ = np.histogram(values, bins=edges)
    writer.add_histogram_raw(tag, float(values.min()), float(values.max()), int(values.size),
                             float(values.sum()), float(np.sum(values.astype(np.float64) ** 2)),
                             edges[1:].tolist(), counts.tolist(), step)


def _write_step(writer, a: Loaded, b: Loaded, shared: list[str]) -> None:
    """Histograms and pattern images of one compared step."""
    for path in shared:
        nonzero = [run.weights[path][run.weights[path] != 0] for run in (a, b)]
        if all(v.size for v in nonzero):
            lo = min(float(v.min()) for v in nonzero)
            hi = max(float(v.max()) for v in nonzero)
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
            for side, values in zip("ab", nonzero, strict=True):
                _write_histogram(writer, f"nonzero_weights/{path}/{side}", values, edges,
                                 b.step)
        if path in a.sparse or path in b.sparse:
            writer.add_image(f"pattern/{path}", pattern_tile(a, b, path), b.step,
                             dataformats="HWC")


def _varies(values: list[float]) -> bool:
    return len(values) > 1 and max(values) - min(values) > 1e-9 * max(1.0, abs(max(values)))


def _write_summary(writer, pair: Pair, comparison: Comparison, layout: bool,
                   hparam_keys: list[str]) -> None:
    """Scalars, overview images, the text summary and hparams of one pair."""
    from tensorboardX.summary import hparams as hparams_summary

    rows = [r for r in comparison.rows if r["pair"] == pair.name and "note" not in r]
    steps = comparison.steps(pair)
    means = comparison.means(pair)  # every metric's mean per step, computed once
    drawn: list[str] = []
    for metric in METRICS:
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r.get(metric) is not None:
                series.setdefault(r["layer"], []).append((r["step"], r[metric]))
        if not series or (metric in STATE_METRICS and not any(
                _varies([v for _, v in s]) for s in series.values())):
            continue
        drawn.append(metric)
        for layer, points in series.items():
            for s, v in points:
                writer.add_scalar(f"{metric}/{layer}", v, s)
        for mean in means:
            writer.add_scalar(f"mean/{metric}", mean[metric], mean["step"])
        writer.add_image(f"overview/{metric}", _figure_pixels(
            comparison.overview_figure(metric, pair)), steps[-1], dataformats="HWC")
    for key, value in pair.final.items():
        writer.add_scalar(f"final/{key}", value, steps[-1])
    writer.add_text("summary", comparison.markdown(pair), steps[-1])
    if layout:  # one layout for the whole comparison: one chart per metric, every layer
        writer.add_custom_scalars({"B vs A, all layers": {
            metric: ["Multiline", [f"^{metric}/"]] for metric in drawn}})
    hparams = {"pair": pair.name}
    for key in hparam_keys:
        for side, settings in zip("ab", pair.settings, strict=True):
            value = settings.get(key)
            hparams[f"{side}.{key}"] = (value if isinstance(value, (int, float, str, bool))
                                        else str(value))
    metrics = {f"mean/{m}": 0.0 for m in drawn}
    metrics.update({f"final/{k}": 0.0 for k in pair.final})
    for summary in hparams_summary(hparams, metrics):
        writer.file_writer.add_summary(summary)
