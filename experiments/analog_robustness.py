"""Robustness of noise-trained models on simulated analog hardware (PCM drift, activation
noise): an MLP on digits and a small GPT on text.

Each task is trained four ways with the same seed and steps:

(a) clean;
(b) weight-noise injection, additive, std 0.06 of max|W| per layer (aihwkit's tutorial
    setting), on every linear layer;
(c) activation noise, uncorrelated (one draw per neuron), on every activation layer;
(d) activation noise, correlated (one draw per vector shared across the layer);

and each model is then evaluated (1) programmed on PCM (aihwkit's PCMLikeNoiseModel,
with and without global drift compensation) and read 1 min, 1 h, 1 day, 30 days and 1 year after
programming, ``--repeats`` chips each; (2) with activation noise of increasing strength,
uncorrelated and correlated, kept on in evaluation. (1) tests a noise the activation-noise
models never saw and (2) one the weight-noise model never saw: the noise-agnostic check.

Writes ``results.md`` / ``results.csv`` and ``pcm_drift.png`` / ``activation_noise.png``
under ``--out``. All analog effects are simulated in floating point.

    python experiments/analog_robustness.py                      # ~10 min on 2 CPU cores
    python experiments/analog_robustness.py --mlp-steps 2000 --gpt-steps 3000 --repeats 10 \\
        --gpt-override model.n_layer=4 --gpt-override model.block_size=128

Literature (Duque et al. 2024; aihwkit tutorials): noise-trained models keep much more of
their accuracy under hardware noise than clean-trained ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.analog import AIHWKIT_TIMES  # noqa: E402
from sparsejax.analog_eval import (  # noqa: E402
    evaluate_activation_noise,
    evaluate_analog,
    time_label,
)
from sparsejax.config import load_config  # noqa: E402
from sparsejax.runs import load_model  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, text_data, training_wall_seconds, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = {  # config, linear layers (all programmed on PCM), activation layers, metric
    "mlp": ("mlp_digits.yaml", "layers/\\d+|head", "acts/\\d+", "accuracy"),
    "gpt": ("gpt_tiny.yaml", "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))",
            "blocks/\\d+/mlp/act", "loss"),
}
GPT_SMALL = ["model.n_layer=2", "model.block_size=64", "data.batch_size=32",
             "train.eval_batches=8"]


def variants(linears: str, acts: str, weight_std: float, act_std: float) -> dict[str, str]:
    analog = "rules=[{{path: '{path}', analog: {{{spec}}}}}]"
    return {
        "clean": "rules=[]",
        "weight noise": analog.format(path=linears, spec=f"weight_noise: {weight_std}"),
        "act noise": analog.format(path=acts, spec=f"act_noise: {act_std}"),
        "act noise (corr.)": analog.format(
            path=acts, spec=f"act_noise: {act_std}, act_noise_correlated: true"),
    }


def run_task(task: str, args, common: list[str], runs: Path) -> list[dict]:
    config, linears, acts, metric = TASKS[task]
    steps = args.mlp_steps if task == "mlp" else args.gpt_steps
    extra = ([] if task == "mlp" else [*GPT_SMALL, *text_data(args.data)[1],
                                       *args.gpt_override])
    rows = []
    for name, rule in variants(linears, acts, args.weight_noise, args.act_noise).items():
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
        run_dir = runs / task / slug
        cfg = load_config(REPO / "configs" / config, [
            *common, *extra, f"train.steps={steps}",
            f"optimizer.warmup_steps={min(50, steps // 10)}", rule, f"name=analog_{task}_{slug}",
            f"run_dir={run_dir}"])
        res = run(cfg)
        model, cfg, _ = load_model(run_dir)
        base = {"task": task, "trained": name, "metric": metric,
                "train_seconds": training_wall_seconds(run_dir, res["steps"])}
        for test, compensate in (("pcm", True), ("pcm (no comp.)", False)):
            pcm = evaluate_analog(model, cfg, args.times, repeats=args.repeats,
                                  seed=args.seed, compensate=compensate, layers=linears)
            if compensate:
                rows.append({**base, "test": "digital", "level": 0.0,
                             "mean": pcm[0][f"{metric}_mean"], "std": 0.0})
            for row in pcm[1:]:
                rows.append({**base, "test": test, "level": row["t_seconds"],
                             "mean": row[f"{metric}_mean"], "std": row[f"{metric}_std"]})
        for correlated in (False, True):
            for row in evaluate_activation_noise(model, cfg, args.levels, correlated,
                                                 repeats=args.repeats):
                rows.append({**base, "test": "act corr." if correlated else "act",
                             "level": row["act_noise"], "mean": row[f"{metric}_mean"],
                             "std": row[f"{metric}_std"]})
    return rows


def _pick(rows, task, trained, test):
    return [r for r in rows if r["task"] == task and r["trained"] == trained
            and r["test"] == test]


def markdown(rows: list[dict], args, cmd: str) -> list[str]:
    lines = ["# Analog robustness: noise-trained vs clean models under PCM drift and "
             "activation noise", "", f"Command: `{cmd}`  ",
             f"Training noise: weight {args.weight_noise} x max|W| (additive), activation "
             f"{args.act_noise} (additive); seed {args.seed}; {args.repeats} chips / noise "
             "draws per cell (mean +- std). PCM: aihwkit PCMLikeNoiseModel defaults, global "
             "drift compensation on and off, every linear layer programmed. Simulation on 2 CPU "
             "cores.",
             ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = _pick(rows, task, "clean", "digital")[0]["metric"]
        better = "higher" if metric == "accuracy" else "lower"
        trained = list(dict.fromkeys(r["trained"] for r in rows if r["task"] == task))
        lines += [f"## {task.upper()}: validation {metric} ({better} is better)", ""]
        for test in ("pcm", "pcm (no comp.)"):
            comp = "with" if test == "pcm" else "without"
            lines += [f"PCM, read at times after programming, {comp} global drift "
                      "compensation:", "",
                      "| trained with | digital | "
                      + " | ".join(time_label(t) for t in args.times) + " |",
                      "|---|---|" + "---|" * len(args.times)]
            for name in trained:
                digital = _pick(rows, task, name, "digital")[0]["mean"]
                cells = [f"{r['mean']:.4f} +- {r['std']:.4f}"
                         for r in _pick(rows, task, name, test)]
                lines.append(f"| {name} | {digital:.4f} | " + " | ".join(cells) + " |")
            lines.append("")
        for test in ("act", "act corr."):
            kind = "correlated" if test == "act corr." else "uncorrelated"
            lines += [f"Activation noise in evaluation ({kind}, std):", "",
                      "| trained with | " + " | ".join(f"{x:g}" for x in args.levels) + " |",
                      "|---|" + "---|" * len(args.levels)]
            for name in trained:
                cells = [f"{r['mean']:.4f} +- {r['std']:.4f}"
                         for r in _pick(rows, task, name, test)]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Change from the digital model (last time / strongest noise):", "",
                  "| trained with | PCM | PCM, no compensation | act. noise | "
                  "act. noise, correlated |", "|---|---|---|---|---|"]
        for name in trained:
            digital = _pick(rows, task, name, "digital")[0]["mean"]
            cells = [f"{_pick(rows, task, name, t)[-1]['mean'] - digital:+.4f}"
                     for t in ("pcm", "pcm (no comp.)", "act", "act corr.")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _draw(ax, rows: list[dict], task: str, test: str) -> str:
    """One errorbar line per training variant of ``task`` under ``test``; returns the
    metric's name."""
    for name in dict.fromkeys(r["trained"] for r in rows if r["task"] == task):
        pts = _pick(rows, task, name, test)
        ax.errorbar([r["level"] for r in pts], [r["mean"] for r in pts],
                    yerr=[r["std"] for r in pts], marker="o", ms=3, capsize=2, label=name)
    return f"val {pts[0]['metric']}"


def plots(rows: list[dict], out: Path) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 6.4), squeeze=False)
    for row_axes, test in zip(axes, ("pcm", "pcm (no comp.)"), strict=True):
        for ax, task in zip(row_axes, tasks, strict=True):
            comp = "drift compensated" if test == "pcm" else "no drift compensation"
            ax.set(xscale="log", xlabel="seconds after programming",
                   ylabel=_draw(ax, rows, task, test), title=f"{task.upper()} on PCM, {comp}")
    save_figure(fig, out / "pcm_drift.png", fontsize=7)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks, strict=True):
        for ax, test in zip(row_axes, ("act", "act corr."), strict=True):
            kind = "correlated" if test == "act corr." else "uncorrelated"
            ax.set(xlabel="activation noise std in evaluation",
                   ylabel=_draw(ax, rows, task, test), title=f"{task.upper()}, {kind} noise")
    save_figure(fig, out / "activation_noise.png", fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mlp,gpt")
    parser.add_argument("--mlp-steps", type=int, default=500)
    parser.add_argument("--gpt-steps", type=int, default=300)
    parser.add_argument("--gpt-override", action="append", default=[],
                        help="dotted override of the GPT runs (repeatable)")
    parser.add_argument("--weight-noise", type=float, default=0.06)
    parser.add_argument("--act-noise", type=float, default=0.2)
    parser.add_argument("--levels", default="0,0.1,0.2,0.4,0.8",
                        help="activation noise stds tested in evaluation")
    parser.add_argument("--times", default=",".join(f"{t:g}" for t in AIHWKIT_TIMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None, help="text file (default: tinyshakespeare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "experiments/results/analog_robustness"))
    args = parser.parse_args()
    args.levels = [float(x) for x in args.levels.split(",")]
    args.times = [float(x) for x in args.times.split(",")]

    out = Path(args.out)
    runs = REPO / "runs" / "analog_robustness" / out.name
    common = ["logging.progress=lines", "checkpoint.every=100000", "train.eval_every=100000",
              f"train.seed={args.seed}"]
    rows = []
    for task in args.tasks.split(","):
        rows += run_task(task, args, common, runs)

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    cmd = " ".join(["python experiments/analog_robustness.py", f"--tasks {args.tasks}",
                    f"--mlp-steps {args.mlp_steps}", f"--gpt-steps {args.gpt_steps}",
                    f"--repeats {args.repeats}",
                    *(f"--gpt-override {o}" for o in args.gpt_override)])
    lines = markdown(rows, args, cmd)
    (out / "results.md").write_text("\n".join(lines))
    plots(rows, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
