"""Analog inference evaluation of a trained run: program its weights onto simulated PCM
devices, read them at times after programming, evaluate (``sparsejax evaluate-analog``).

One repeat = one chip: the weights are programmed once (programming noise, drift
exponents) and read at every time of the grid (drift and 1/f read noise drawn per read),
so the rows of a repeat share their programming error as on hardware. Drift compensation
(aihwkit's global rescaling, reference read right after programming) is on by default.
Optionally the activation layers add noise during evaluation (noise-robustness check).
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.analog import (
    AIHWKIT_TIMES,
    PCMNoiseModel,
    drift_compensation,
)
from sparsejax.config import Config, ConfigError
from sparsejax.nn import Activation, Linear, named_layers, transform_slots
from sparsejax.tasks import Task, build_task
from sparsejax.transforms import NoiseCounter
from sparsejax.transforms.analog import AnalogSpec

__all__ = ["analog_target_layers", "evaluate_activation_noise", "evaluate_analog",
           "format_table", "parse_times", "program_layers", "read_layers", "time_label",
           "set_eval_activation_noise", "write_report"]


def parse_times(text: str) -> list[float]:
    """``"60,3600,1d"``-style list of seconds (plain numbers; suffixes s, m, h, d, y)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "y": 365 * 86400.0}
    times = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([smhdy]?)\s*", item)
        try:
            value = float(match.group(1)) * units.get(match.group(2) or "s")
        except (AttributeError, ValueError):
            raise ConfigError(f"bad --times entry '{item}': expected seconds, e.g. "
                              "60,3600,86400 (or 1m,1h,1d,30d,1y)") from None
        if value < 0:
            raise ConfigError(f"bad --times entry '{item}': must be >= 0")
        times.append(value)
    return times


def analog_target_layers(model: nnx.Module, pattern: str | None = None
                         ) -> list[tuple[str, Linear]]:
    """The ``Linear`` layers to program: those matching ``pattern`` (regex, fullmatch), or
    by default the layers with an analog spec, or every ``Linear`` when none has one."""
    layers = named_layers(model, (Linear,))
    if pattern is not None:
        chosen = [(p, m) for p, m in layers if re.fullmatch(pattern, p)]
        if not chosen:
            raise ConfigError(f"--layers '{pattern}' matches no linear layer; layer paths "
                              f"are: {', '.join(p for p, _ in layers)}")
        return chosen
    analog = [(p, m) for p, m in layers if m.analog is not None]
    return analog or layers


def _programming_target(layer: Linear) -> jax.Array:
    """The weight that goes onto the devices: the inference weight, through every weight
    transform of the layer (the analog tile's clip included)."""
    return layer.effective_kernel()


def program_layers(targets: dict[str, jax.Array], noise_model: PCMNoiseModel,
                   key: jax.Array) -> dict[str, Any]:
    """``{path: ProgrammedWeights}`` for ``{path: weight}``; one key per layer path."""
    return {path: noise_model.program(w, jax.random.fold_in(key, i))
            for i, (path, w) in enumerate(sorted(targets.items()))}


def read_layers(programmed: dict[str, Any], noise_model: PCMNoiseModel, t: float,
                key: jax.Array, compensate: bool = True
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``({path: weight read at t, times alpha}, {path: alpha})``; ``alpha`` is the global
    drift compensation against the weights right after programming (1 when off)."""
    weights, alphas = {}, {}
    for i, path in enumerate(sorted(programmed)):
        w_t = noise_model.read(programmed[path], t, jax.random.fold_in(key, i))
        alpha = (drift_compensation(noise_model.weights_at_programming(programmed[path]), w_t)
                 if compensate else jnp.ones(()))
        weights[path], alphas[path] = alpha * w_t, alpha
    return weights, alphas


def set_eval_activation_noise(model: nnx.Module, std: float, correlated: bool = False,
                              kind: str = "add", seed: int = 0) -> int:
    """Give every ``Activation`` layer noise of ``std`` that stays on in evaluation (the
    noise-robustness check: test under a noise the model may not have trained with);
    ``std = 0`` removes it. Returns the number of layers."""
    acts = named_layers(model, (Activation,))
    for i, (_, act) in enumerate(acts):
        spec = AnalogSpec(act_noise=std, act_noise_kind=kind, act_noise_correlated=correlated,
                          noise_in_eval=True)
        act.configure({"analog": spec} if std else {}, seed=seed * 1000 + i)
    return len(acts)


def _make_eval_step(graphdef: nnx.GraphDef, task: Task) -> Callable:
    """The task's eval sums with the noise counters of the analog layers set to ``call``,
    so each batch of an evaluation draws fresh noise (the trainer's eval step discards
    state, so its counters would repeat)."""

    def eval_step(params, rest, batch, call):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        for _, _, _, slot in transform_slots(model):
            if isinstance(slot.spec, NoiseCounter):
                slot.set_state(slot.spec.with_draw_count(slot.view(None).state, call))
        return task.eval_sums(model, batch)

    return jax.jit(eval_step)


def _evaluate(eval_step: Callable, model: nnx.Module, task: Task, first_call: int
              ) -> dict[str, float]:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    sums: dict[str, float] = {}
    for i, batch in enumerate(task.eval_batches()):
        out = jax.device_get(eval_step(params, rest, batch, jnp.uint32(first_call + i)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in task.finish_eval(sums).items()}


def evaluate_analog(model: nnx.Module, cfg: Config, times: Sequence[float] = AIHWKIT_TIMES,
                    repeats: int = 5, seed: int = 0,
                    noise_model: PCMNoiseModel | None = None, compensate: bool = True,
                    layers: str | None = None, task: Task | None = None,
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate ``model`` digitally, then programmed on PCM and read at each of ``times``
    (seconds after programming), ``repeats`` chips each. Returns one row per time:
    ``{"t_seconds", "<metric>_mean", "<metric>_std", "alpha_mean", "repeats"}``; the first
    row (``t_seconds = None``) is the digital model. The model is left as it was."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    noise_model = noise_model or PCMNoiseModel()
    task = task or build_task(cfg)
    chosen = analog_target_layers(model, layers)
    targets = {p: _programming_target(m) for p, m in chosen}
    digital = _evaluate(_make_eval_step(nnx.split(model, nnx.Param, ...)[0], task),
                        model, task, 0)
    rows: list[dict[str, Any]] = [{"t_seconds": None, "repeats": 1, "alpha_mean": 1.0,
                                   **{f"{k}_mean": v for k, v in digital.items()},
                                   **{f"{k}_std": 0.0 for k in digital}}]
    for path, layer in chosen:  # the graph with weight overrides: one compile for all reads
        layer.set_weight_override(targets[path])
    try:
        eval_step = _make_eval_step(nnx.split(model, nnx.Param, ...)[0], task)
        program = jax.jit(lambda ws, k: program_layers(ws, noise_model, k))
        read = jax.jit(lambda pr, t, k: read_layers(pr, noise_model, t, k, compensate))
        results = {t: [] for t in times}
        for r in range(repeats):
            chip_key = jax.random.fold_in(jax.random.key(seed), r)
            programmed = program(targets, jax.random.fold_in(chip_key, 0))
            for j, t in enumerate(times):
                weights, alphas = read(programmed, jnp.float32(t),
                                       jax.random.fold_in(chip_key, j + 1))
                for path, layer in chosen:
                    layer.set_weight_override(weights[path])
                metrics = _evaluate(eval_step, model, task, (r * len(times) + j) * 10_000)
                metrics["alpha"] = float(np.mean([float(a) for a in alphas.values()]))
                results[t].append(metrics)
                if progress is not None:
                    progress(f"chip {r + 1}/{repeats} t={t:g}s "
                             + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        for t in times:
            keys = [k for k in results[t][0] if k != "alpha"]
            rows.append({"t_seconds": t, "repeats": repeats,
                         "alpha_mean": float(np.mean([m["alpha"] for m in results[t]])),
                         **{f"{k}_mean": float(np.mean([m[k] for m in results[t]]))
                            for k in keys},
                         **{f"{k}_std": float(np.std([m[k] for m in results[t]], ddof=1)
                                              if repeats > 1 else 0.0) for k in keys}})
    finally:
        for _, layer in chosen:
            layer.set_weight_override(None)
    return rows


def evaluate_activation_noise(model: nnx.Module, cfg: Config, levels: Sequence[float],
                              correlated: bool = False, kind: str = "add", repeats: int = 3,
                              task: Task | None = None) -> list[dict[str, Any]]:
    """Evaluate ``model`` with activation noise of each std in ``levels`` kept on in
    evaluation on every ``Activation`` layer (``repeats`` draws per level, fresh noise per
    batch). Returns ``[{"act_noise", "<metric>_mean", "<metric>_std"}, ...]``; the model
    is left without evaluation noise (its own training-time analog specs are replaced on
    the activation layers: call on a loaded model)."""
    task = task or build_task(cfg)
    rows = []
    try:
        for level in levels:
            set_eval_activation_noise(model, level, correlated, kind)
            eval_step = _make_eval_step(nnx.split(model, nnx.Param, ...)[0], task)
            runs = [_evaluate(eval_step, model, task, r * 1_000_000) for r in range(repeats)]
            rows.append({"act_noise": level,
                         **{f"{k}_mean": float(np.mean([m[k] for m in runs])) for k in runs[0]},
                         **{f"{k}_std": float(np.std([m[k] for m in runs], ddof=1))
                            if repeats > 1 else 0.0 for k in runs[0]}})
    finally:
        set_eval_activation_noise(model, 0.0)
    return rows


def time_label(t: float | None) -> str:
    if t is None:
        return "digital"
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if t >= size and t % size == 0:
            return f"{t / size:g}{unit}"
    return f"{t:g}s"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: time, then mean +- std of each metric, then the mean alpha."""
    metrics = [k[:-5] for k in rows[0] if k.endswith("_mean") and k != "alpha_mean"]
    lines = ["| time | " + " | ".join(metrics) + " | drift alpha |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for row in rows:
        cells = [f"{row[m + '_mean']:.4f} +- {row[m + '_std']:.4f}" for m in metrics]
        lines.append(f"| {time_label(row['t_seconds'])} | " + " | ".join(cells)
                     + f" | {row['alpha_mean']:.4f} |")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], out_dir: Path, header: str) -> None:
    """``out_dir/analog_eval.{md,csv}`` and TensorBoard scalars ``analog/<metric>_{mean,
    std}`` at step = seconds after programming (``out_dir`` must not exist yet)."""
    from tensorboardX import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=False)
    (out_dir / "analog_eval.md").write_text(f"{header}\n\n{format_table(rows)}\n")
    with open(out_dir / "analog_eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tb = SummaryWriter(str(out_dir))
    try:
        for row in rows[1:]:
            for k, v in row.items():
                if k.endswith(("_mean", "_std")):
                    tb.add_scalar(f"analog/{k}", v, global_step=int(row["t_seconds"]))
        tb.add_text("analog/table", format_table(rows))
    finally:
        tb.close()


def default_out_dir(run_dir: Path) -> Path:
    """``<run_dir>/analog_eval/<UTC time>``, never an existing directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = run_dir / "analog_eval" / stamp
    i = 1
    while out.exists():
        out = run_dir / "analog_eval" / f"{stamp}-{i}"
        i += 1
    return out
