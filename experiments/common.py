"""Helpers shared by the experiment scripts: reading TensorBoard scalars, writing CSV, and
timing compiled trainer steps side by side."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparsejax.config import load_config
from sparsejax.optim import build_optimizer
from sparsejax.runs import init_model
from sparsejax.tasks import build_task
from sparsejax.train import make_train_step


def scalar_events(run_dir: str | Path) -> dict[str, list]:
    """``{tag: [ScalarEvent(wall_time, step, value), ...]}`` of a run directory."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def text_data(path: str | None) -> tuple[str, list[str]]:
    """The experiments' corpus: ``path``, else the repository's tinyshakespeare
    (``data/tinyshakespeare.txt``). Returns it and its config overrides."""
    data = path or str(SHAKESPEARE)
    return data, ["data.source=text", f"data.path={data}"]


def events(run_dir: Path, tag: str) -> list:
    return scalar_events(run_dir).get(tag, [])


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events(run_dir, tag)]


def training_wall_seconds(run_dir: Path, steps: int) -> float:
    """Wall time of the training loop, from the TensorBoard event times of train/loss
    (extrapolated over the first logging interval; in-loop evaluation included). Read from
    the events so that a finished run that is reused still reports its training time."""
    loss = events(run_dir, "train/loss")
    first, last = loss[0], loss[-1]
    return (last.wall_time - first.wall_time) * steps / max(last.step - first.step, 1)


def save_figure(fig, path: str | Path, **legend: Any) -> None:
    """Grid and legend (``legend`` kwargs, e.g. ``fontsize``) on every axis of ``fig``,
    then a tight layout saved as a small PNG (dpi 90) at ``path``."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path, floats: tuple[str, ...] = (), ints: tuple[str, ...] = ()
             ) -> list[dict[str, Any]]:
    """The rows :func:`write_csv` wrote (``[]`` when ``path`` does not exist), with the
    columns ``floats`` and ``ints`` converted back to numbers."""
    if not Path(path).is_file():
        return []
    with open(path) as f:
        return [{**row, **{k: float(row[k]) for k in floats}, **{k: int(row[k]) for k in ints}}
                for row in csv.DictReader(f)]


def compiled_step(config: str, overrides: list[str]):
    """The trainer's full step for ``config`` + ``overrides``, compiled ahead, with its
    initial state and 8 training batches: ``[compiled, state, batches]``."""
    cfg = load_config(config, overrides)
    task = build_task(cfg)
    model = init_model(cfg)
    tx, _, frozen = build_optimizer(cfg, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = [params, rest, tx.init(params), jax.random.key_data(jax.random.key(0))]
    step = jax.jit(make_train_step(graphdef, task, tx, use_dropout=False,
                                   frozen_labels=frozen, grad_accum=cfg.train.grad_accum))
    batches = [task.train_batch(i) for i in range(8)]
    compiled = step.lower(*state, batches[0], np.int32(0)).compile()
    return compiled, state, batches


def time_steps(entry, steps: int) -> float:
    """Seconds per step of ``steps`` steps of a :func:`compiled_step` entry (state carried)."""
    compiled, state, batches = entry
    params, rest, opt_state, rng = state
    start = time.perf_counter()
    for i in range(steps):
        params, rest, opt_state, metrics = compiled(params, rest, opt_state, rng,
                                                    batches[i % len(batches)], np.int32(i))
    jax.block_until_ready((params, metrics))
    entry[1][:] = [params, rest, opt_state, rng]
    return (time.perf_counter() - start) / steps


def overhead_args(description: str, out: Path):
    """Command-line arguments shared by the step-time overhead benchmarks."""
    import argparse

    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", nargs="?", default=str(repo / "configs" / "gpt_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(out))
    return parser.parse_args()


def time_variants(config: str, variants: dict[str, list[str]], steps: int, rounds: int
                  ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time each variant's compiled step (``{name: overrides}``; the first is the baseline)
    in alternating rounds so that machine noise hits all alike. Returns the seconds per
    step of every round and the median over rounds of each round's ratio to the baseline."""
    entries = {name: compiled_step(config, ov) for name, ov in variants.items()}
    base = next(iter(entries))
    for entry in entries.values():
        time_steps(entry, 2)  # warm caches
    times: dict[str, list[float]] = {name: [] for name in entries}
    for r in range(rounds):
        for name, entry in entries.items():
            times[name].append(time_steps(entry, steps))
        ratios = "  ".join(f"{n} {times[n][-1] / times[base][-1]:.3f}" for n in entries)
        print(f"round {r}: {ratios}", flush=True)
    ratio = {n: statistics.median(t / b for t, b in zip(times[n], times[base], strict=True))
             for n in entries}
    return times, ratio


def overhead_report(title: str, script: str, args, setup: str, baseline: str,
                    times: dict[str, list[float]], ratio: dict[str, float],
                    targets: dict[str, float], footer: str) -> None:
    """Write and print the ``results.md`` of a step-time overhead benchmark: title, the
    command, ``setup`` (what the variants change), the machine, the table of
    :func:`step_time_rows` against ``baseline`` and a ``footer`` paragraph."""
    lines = [f"# {title}", "",
             f"Command: `python experiments/{script} --steps {args.steps} "
             f"--rounds {args.rounds}`  ",
             f"Config `{Path(args.config).name}`{setup}; {jax.device_count()} x "
             f"{jax.devices()[0].platform}, jax {jax.__version__}; median over rounds of the "
             "per-round ratio.", "",
             f"| variant | step time (ms, median) | ratio to {baseline} | target |",
             "|---|---|---|---|", *step_time_rows(times, ratio, targets), "", footer, ""]
    write_results(args.out, lines)


def step_time_rows(times: dict[str, list[float]], ratio: dict[str, float],
                   targets: dict[str, float]) -> list[str]:
    """Markdown rows ``| variant | median ms | ratio | target |`` of :func:`time_variants`."""
    rows = []
    for name in times:
        target = f"<= {targets[name]:.2f}" if name in targets else ""
        rows.append(f"| {name} | {1000 * statistics.median(times[name]):.1f} | "
                    f"{ratio[name]:.3f} | {target} |")
    return rows


def tfp_jax():
    """TensorFlow Probability's JAX substrate, or None where it is not installed."""
    try:
        from tensorflow_probability.substrates import jax as tfp
    except ImportError:
        return None
    return tfp


def tfp_version() -> str:
    """", TFP <version> (JAX substrate)" when TensorFlow Probability imports, else ""."""
    tfp = tfp_jax()
    return "" if tfp is None else f", TFP {tfp.__version__} (JAX substrate)"


def write_results(out: str | Path, lines: list[str]) -> None:
    """Write ``results.md`` under ``out`` (created) and print it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
