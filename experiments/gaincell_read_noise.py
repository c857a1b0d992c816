"""Read noise on gain-cell attention (simulated): how much validation loss the adapted
gain-cell GPTs lose when every analog read - the scores of each query and each tile's
read-out - is noisy, at a noise-to-signal energy ratio per read (``read_noise``; the
reference code's ``ReadNoise`` uses 0.1, an SNR of 10 dB, in evaluation only).

It evaluates the finished runs of ``experiments/gaincell_adaptation.py --nonlinear``
(calibrated and fine-tuned, the non-linear-cell continuation, and the gain-cell GPT
trained from scratch), and two continuations of the calibrated run that it trains itself
for ``--continue-steps``: without noise, and **noise-aware** (``read_noise_train`` at
``--train-noise``). Each model is restored with ``read_noise`` set on its attention rule
(``train.init_from`` of the run itself), ``--repeats`` noise draws per ratio (the rule's
``count`` set per draw; within one evaluation the draw is fixed per layer). The softmax
teacher is the reference line. Writes ``results.md``, ``results.csv`` and
``loss_vs_snr.png``; ``--arms`` re-evaluates some arms and keeps the others' rows.

    python experiments/gaincell_adaptation.py --nonlinear   # first: the runs it reads
    python experiments/gaincell_read_noise.py                # ~25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.evaluation import evaluate_model  # noqa: E402
from sparsejax.nn import transform_slots  # noqa: E402
from sparsejax.runs import init_model  # noqa: E402
from sparsejax.tasks import build_task  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_csv, save_figure, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARMS = {"calibrated": "calibrated + 300 steps", "nonlinear": "then 300 steps non-linear cell",
        "scratch": "from scratch, 1300 steps", "continued": "calibrated + 600 steps",
        "noise_aware": "calibrated + 300 + 300 noise-aware steps"}
TRAINED_HERE = ("continued", "noise_aware")


def continue_calibrated(runs: Path, name: str, steps: int, train_noise: float) -> None:
    """``name``: the calibrated run trained ``steps`` more at its fine-tuning lr, with
    read noise ``train_noise`` in training (0: none)."""
    if (runs / name / "results.json").is_file():
        return
    source = runs / "calibrated"
    noise = ([f"rules.0.attention.read_noise={train_noise}",
              "rules.0.attention.read_noise_train=true"] if train_noise else [])
    print(f"{name}: training", flush=True)
    run(load_config(source / "config.yaml",
                    [f"train.init_from={source}", f"train.steps={steps}", *noise,
                     f"name={name}", f"run_dir={runs / name}"]), verbose=False)


def snr_db(ratio: float) -> float:
    return math.inf if ratio == 0 else -10 * math.log10(ratio)


def evaluate_with_read_noise(run_dir: Path, ratio: float, repeats: int) -> list[float]:
    """Validation losses of the run's model with ``read_noise = ratio`` on its attention
    rule, one per noise draw (``count`` = 0 .. repeats - 1; one draw when noiseless)."""
    cfg = load_config(run_dir / "config.yaml", [f"rules.0.attention.read_noise={ratio}",
                                                "rules.0.attention.read_noise_train=false",
                                                f"train.init_from={run_dir}"])
    model = init_model(cfg)
    slots = [slot for _, _, _, slot in transform_slots(model) if slot.spec.kind == "attention"]
    task = build_task(cfg)
    losses = []
    for draw in range(repeats if ratio else 1):
        for slot in slots:
            if "count" in slot.state:
                slot.state["count"][...] = draw
        losses.append(evaluate_model(model, cfg, task)["loss"])
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "gaincell_adaptation"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--continue-steps", type=int, default=300)
    parser.add_argument("--train-noise", type=float, default=0.1,
                        help="read_noise of the noise-aware continuation's training")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                        help="arms to evaluate; the others' rows are kept from results.csv")
    parser.add_argument("--out", default=str(REPO / "experiments/results/gaincell_read_noise"))
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    missing = [name for name in ("teacher", *ARMS) if name not in TRAINED_HERE
               and not (runs / name / "results.json").is_file()]
    if missing:
        sys.exit(f"error: no finished run {runs / missing[0]}: run "
                 "`python experiments/gaincell_adaptation.py --nonlinear` first")
    teacher = json.loads((runs / "teacher" / "results.json").read_text())["val_loss"]
    continue_calibrated(runs, "continued", args.continue_steps, 0.0)
    continue_calibrated(runs, "noise_aware", args.continue_steps, args.train_noise)

    numbers = ("read_noise", "snr_db", "val_loss_mean", "val_loss_std",
               "val_loss_noiseless_run")
    rows = [r for r in read_csv(out / "results.csv", floats=numbers, ints=("draws",))
            if r["arm"] not in args.arms and r["read_noise"] in args.ratios]
    for name, label in ARMS.items():
        if name not in args.arms:
            continue
        trained = json.loads((runs / name / "results.json").read_text())["val_loss"]
        for ratio in args.ratios:
            losses = evaluate_with_read_noise(runs / name, ratio, args.repeats)
            rows.append({"arm": name, "read_noise": ratio, "snr_db": snr_db(ratio),
                         "val_loss_mean": statistics.fmean(losses),
                         "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                         "draws": len(losses), "val_loss_noiseless_run": trained})
            print(f"{label}: read_noise {ratio:g} -> {statistics.fmean(losses):.4f}",
                  flush=True)
    rows.sort(key=lambda r: (list(ARMS).index(r["arm"]), r["read_noise"]))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)

    fig, ax = plt.subplots(figsize=(6, 4))
    noisy = sorted({r["read_noise"] for r in rows if r["read_noise"] > 0})
    for name, label in ARMS.items():
        if not any(r["arm"] == name for r in rows):
            continue
        points = [(r["read_noise"], r["val_loss_mean"], r["val_loss_std"]) for r in rows
                  if r["arm"] == name and r["read_noise"] > 0]
        clean = next((r["val_loss_mean"] for r in rows if r["arm"] == name
                      and r["read_noise"] == 0), None)
        line = ax.errorbar([p[0] for p in points], [p[1] for p in points],
                           yerr=[p[2] for p in points], fmt="o-", capsize=3, label=label)
        if clean is not None:
            ax.axhline(clean, color=line[0].get_color(), ls=":", lw=0.8)
    ax.axhline(teacher, color="black", ls="--", label="softmax teacher")
    ax.set_xscale("log")
    ax.set_xticks(noisy, [f"{x:g}\n({snr_db(x):.1f} dB)" for x in noisy])
    ax.set_xlabel("read noise: noise / signal energy per read (SNR)")
    ax.set_ylabel("val loss (nats / char)")
    ax.set_title("dotted: the same model without read noise")
    save_figure(fig, out / "loss_vs_snr.png", fontsize=8)

    lines = ["# Gain-cell attention under read noise (simulated)", "",
             f"Command: `python experiments/gaincell_read_noise.py --ratios "
             f"{' '.join(f'{r:g}' for r in args.ratios)} --repeats {args.repeats} "
             f"--continue-steps {args.continue_steps} --train-noise {args.train_noise:g}` "
             "(after `python experiments/gaincell_adaptation.py --nonlinear`).", "",
             "Validation loss on 50 fixed batches, mean +- sd over noise draws; noise on "
             "every analog read in evaluation; only the noise-aware arm also trained with it "
             f"(read_noise {args.train_noise:g}); softmax teacher {teacher:.4f}.", "",
             "| model | " + " | ".join(
                 "no noise" if r == 0 else f"{r:g} ({snr_db(r):.0f} dB)" for r in args.ratios)
             + " |", "|---|" + "---|" * len(args.ratios)]
    for name, label in ARMS.items():
        if not any(r["arm"] == name for r in rows):
            continue
        cells = []
        for ratio in args.ratios:
            r = next((x for x in rows if x["arm"] == name and x["read_noise"] == ratio), None)
            cells.append("-" if r is None else f"{r['val_loss_mean']:.4f}" + (
                f" +- {r['val_loss_std']:.4f}" if r["draws"] > 1 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
