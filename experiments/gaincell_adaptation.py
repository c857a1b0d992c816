"""Adapting a trained softmax GPT to gain-cell attention (analog, simulated), three ways.

A softmax GPT (the teacher) is trained on character-level tinyshakespeare
(``configs/gpt_gaincell.yaml``'s shape: 4 layers x 4 heads x 128, block 128). Its
attention is then swapped for gain-cell attention (window 64, tiles of 64 tokens,
16 / 8 / 32-level converters; ``sparsejax.transforms.attention.gaincell``) and
fine-tuned for ``--finetune-steps`` steps in three arms:

- (a) ``uncalibrated``: the reference code's initial affines (a = 1, b = 0 / 0.45);
- (b) ``calibrated``: the paper's statistics-matching initialisation on 8 batches
  (``sparsejax.adapt``), as ``sparsejax train configs/gpt_gaincell.yaml
  train.init_from=TEACHER`` does;
- (c) ``scratch``: a gain-cell GPT trained from scratch for the teacher's plus the
  fine-tuning steps (the same total budget).

Optionally (``--nonlinear``), arm (b) continues with the non-linear cell model for the
same number of steps (the paper's second stage).

Writes ``results.md``, ``results.csv`` and ``curves.png`` under ``--out``; the step time
of the gain-cell GPT over the softmax GPT is measured side by side in the same run.

    python experiments/gaincell_adaptation.py                 # ~30 min on 2 CPU cores
    python experiments/gaincell_adaptation.py --teacher-steps 3000 --finetune-steps 1000

Direction from the paper (Leroux, Manea et al. 2025): calibrated adaptation gets close
to the teacher and beats both the uncalibrated start and training from scratch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.adapt import calibrate_from_teacher  # noqa: E402
from sparsejax.config import load_config  # noqa: E402
from sparsejax.evaluation import evaluate_model  # noqa: E402
from sparsejax.runs import init_model_with_source  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, scalars, time_variants, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt_gaincell.yaml"
ATTN = "blocks/\\d+/attn"


def gaincell_rule(**fields) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in {"method": "gaincell", "window": 64,
                                               "array": 64, **fields}.items())
    return f"rules=[{{path: '{ATTN}', attention: {{{body}}}}}]"


def train_run(runs: Path, name: str, overrides: list[str]) -> dict:
    run_dir = runs / name
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    print(f"{name}: training", flush=True)
    return run(load_config(CONFIG, [*overrides, f"name={name}", f"run_dir={run_dir}"]),
               verbose=False)


def step0_loss(overrides: list[str]) -> float:
    """Validation loss of a fine-tuning arm before its first step (calibrated as ``run``
    would, when the arm asks for it)."""
    cfg = load_config(CONFIG, overrides)
    model, teacher = init_model_with_source(cfg)
    calibrate_from_teacher(cfg, model, teacher)
    return evaluate_model(model, cfg)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--nonlinear", action="store_true",
                        help="also continue arm (b) with the non-linear cell model")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "experiments/results/gaincell_adaptation"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = REPO / "runs" / "gaincell_adaptation"
    common = ["logging.progress=none", "checkpoint.every=100000", "train.eval_every=50"]
    scratch_steps = args.teacher_steps + args.finetune_steps

    teacher_dir = runs / "teacher"
    teacher = train_run(runs, "teacher", [*common, "rules=[]",
                                          f"train.steps={args.teacher_steps}",
                                          "optimizer.lr=1e-3", "optimizer.warmup_steps=100"])
    finetune = [*common, f"train.steps={args.finetune_steps}",
                f"optimizer.lr={args.finetune_lr}", f"train.init_from={teacher_dir}"]
    arms = {
        "uncalibrated": [*finetune, gaincell_rule(calib_batches=0)],
        "calibrated": [*finetune, gaincell_rule(calib_batches=8)],
        "scratch": [*common, f"train.steps={scratch_steps}", "optimizer.lr=1e-3",
                    "optimizer.warmup_steps=100", gaincell_rule()],
    }
    if args.nonlinear:
        arms["calibrated, then non-linear cell"] = [
            *common, f"train.steps={args.finetune_steps}", f"optimizer.lr={args.finetune_lr}",
            f"train.init_from={runs / 'calibrated'}", gaincell_rule(cell="nonlinear")]
    rows = [{"arm": "softmax teacher", "steps": args.teacher_steps, "val_loss_step0": None,
             "val_loss": teacher["val_loss"], "gap_to_teacher": 0.0}]
    curves = {"softmax teacher": scalars(teacher_dir, "val/loss")}
    for arm, overrides in arms.items():
        slug = arm.split(",")[0] if arm != "calibrated, then non-linear cell" else "nonlinear"
        start = None
        if "train.init_from" in " ".join(overrides):
            start = step0_loss(overrides)
        results = train_run(runs, slug, overrides)
        offset = 0 if start is None else args.teacher_steps + (
            args.finetune_steps if slug == "nonlinear" else 0)  # it continues "calibrated"
        curves[arm] = [(s + offset, v) for s, v in scalars(runs / slug, "val/loss")]
        if start is not None:
            curves[arm].insert(0, (offset, start))
        rows.append({"arm": arm, "steps": results["steps"], "val_loss_step0": start,
                     "val_loss": results["val_loss"],
                     "gap_to_teacher": results["val_loss"] - teacher["val_loss"]})
        print(f"{arm}: step 0 {start}, final {results['val_loss']:.4f}", flush=True)

    times, ratio = time_variants(str(CONFIG), {"softmax": ["rules=[]"],
                                               "gain-cell": [gaincell_rule(calib_batches=0)]},
                                 steps=args.timing_steps, rounds=3)
    write_csv(out / "results.csv", rows)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), label=arm,
                    **({"color": "black", "ls": "--"} if arm == "softmax teacher" else {}))
    ax.set_xlabel("training steps (fine-tuning arms start where their source ended)")
    ax.set_ylabel("val loss (nats / char)")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    save_figure(fig, out / "curves.png", fontsize=8)

    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = ["# Gain-cell attention: adapting a softmax GPT", "",
             f"Command: `python experiments/gaincell_adaptation.py --teacher-steps "
             f"{args.teacher_steps} --finetune-steps {args.finetune_steps}"
             f"{' --nonlinear' if args.nonlinear else ''}`  ",
             "Character-level tinyshakespeare, GPT 4 x 4 heads x 128, block 128, batch 32; "
             "gain-cell attention simulated (window 64, tiles of 64, 16 / 8 / 32 levels, "
             "linear cell unless stated). Validation loss on 50 fixed batches.", "",
             "| arm | steps | val loss at step 0 | val loss at the end | gap to teacher |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['steps']} | {fmt(r['val_loss_step0'])} | "
                     f"{r['val_loss']:.4f} | {r['gap_to_teacher']:+.4f} |")
    med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    lines += ["", "Step time (training step, batch 32 x 128, side by side in this run, median "
              f"of 3 rounds): softmax {1000 * med['softmax']:.0f} ms, gain-cell "
              f"{1000 * med['gain-cell']:.0f} ms, ratio {ratio['gain-cell']:.2f}.", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
