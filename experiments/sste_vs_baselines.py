"""S-STE against its baselines on one small pre-training run (the paper's comparison).

Trains dense, STE, SR-STE, S-STE and S-STE+MVUE on the same GPT, data, seed and step
budget, with the FFN linears 2:4 sparse (as in the paper; attention and embeddings dense),
then writes ``results.md`` / ``results.csv`` (final validation loss, gap to dense, final
mask flip rate, wall time) and ``curves.png`` (validation loss and flip rate).

    python experiments/sste_vs_baselines.py                     # ~15 min on 2 CPU cores
    python experiments/sste_vs_baselines.py --steps 3000 --seeds 0 1 2 --override model.n_embd=256

Data: the repository's tinyshakespeare (``data/tinyshakespeare.txt``), or ``--data FILE``
(any text). Paper's claim (Hu, Zhu, Chen 2024): S-STE closes more of the
gap to dense than SR-STE, and SR-STE more than STE. Sparsity here is simulated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, scalars, text_data, training_wall_seconds, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FFN = "blocks/\\d+/mlp/(fc|proj)"
METHODS = {
    "dense": None,
    "ste": "{method: ste}",
    "sr_ste": "{method: sr_ste, decay: 2.0e-4}",
    "sste": "{method: sste}",
    "sste+mvue": "{method: sste, mvue: true}",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", default=None, help="text file (default: tinyshakespeare)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--override", action="append", default=[],
                        help="dotted config override for every run (repeatable)")
    parser.add_argument("--out", default=str(REPO / "experiments/results/sste_vs_baselines"))
    args = parser.parse_args()

    data, data_overrides = text_data(args.data)
    base = ["train.eval_every=50", "checkpoint.every=100000", "logging.log_every=10",
            "logging.progress=lines", f"train.steps={args.steps}",
            f"optimizer.warmup_steps={max(1, args.steps // 12)}", *data_overrides,
            *args.override]
    rows, curves = [], {}
    runs = REPO / "runs" / "sste_vs_baselines"
    if Path(args.out).resolve() != (REPO / "experiments/results/sste_vs_baselines").resolve():
        runs = runs / Path(args.out).name  # variants with other overrides get their own runs
    for method in args.methods:
        for seed in args.seeds:
            run_dir = runs / f"{method}_seed{seed}"
            rule = ([f"rules=[{{path: '{FFN}', sparsity: {METHODS[method]}}}]"]
                    if METHODS[method] else [])
            cfg = load_config(REPO / "configs" / "gpt_tiny.yaml",
                              [*base, f"train.seed={seed}", f"name=sste_vs_{method}",
                               f"run_dir={run_dir}", *rule])
            res = run(cfg)
            flips = scalars(run_dir, "sparsity/flip_rate")
            curves[(method, seed)] = (scalars(run_dir, "val/loss"), flips)
            rows.append({"method": method, "seed": seed, "val_loss": res["val_loss"],
                         "val_bpb": res.get("val_bpb"),
                         "final_flip_rate": flips[-1][1] if flips else None,
                         "wall_seconds": training_wall_seconds(run_dir, res["steps"])})

    dense = {r["seed"]: r["val_loss"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["gap_to_dense"] = r["val_loss"] - dense[r["seed"]] if r["seed"] in dense else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)

    def mean(method, key):
        values = [r[key] for r in rows if r["method"] == method and r[key] is not None]
        return statistics.mean(values) if values else None

    fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"
    cmd = " ".join(["python experiments/sste_vs_baselines.py", f"--steps {args.steps}",
                    "--seeds " + " ".join(map(str, args.seeds)),
                    *(f"--override {o}" for o in args.override),
                    *([f"--data {args.data}"] if args.data else [])])
    lines = ["# S-STE vs STE / SR-STE / dense: 2:4 FFN sparsity, small GPT pre-training", "",
             f"Command: `{cmd}`  ",
             f"Data: `{Path(data).name}`; model "
             "`configs/gpt_tiny.yaml` (0.84M params, FFN linears 2:4 by rule); "
             f"{args.steps} steps; seeds {args.seeds}. Simulated sparsity on 2 CPU cores.", "",
             "| method | val loss | val bpb | gap to dense (nats) | final flip rate | wall s |",
             "|---|---|---|---|---|---|"]
    for m in args.methods:
        lines.append(f"| {m} | {fmt(mean(m, 'val_loss'))} | {fmt(mean(m, 'val_bpb'))} | "
                     f"{fmt(mean(m, 'gap_to_dense'))} | {fmt(mean(m, 'final_flip_rate'), 5)} | "
                     f"{fmt(mean(m, 'wall_seconds'), 0)} |")
    lines += ["", "Values are means over seeds; per-seed rows in `results.csv`; curves in "
              "`curves.png`.", ""]
    (out / "results.md").write_text("\n".join(lines))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (method, seed), (val, flips) in curves.items():
        label = method if len(args.seeds) == 1 else f"{method} s{seed}"
        if val:
            ax1.plot(*zip(*val, strict=True), marker="o", ms=3, label=label)
        if flips:
            ax2.plot(*zip(*flips, strict=True), label=label)
    ax1.set(xlabel="step", ylabel="validation loss (nats)", title="validation loss")
    ax1.set_ylim(top=min(3.0, ax1.get_ylim()[1]))
    ax2.set(xlabel="step", ylabel="fraction of mask entries", title="mask flip rate per step",
            yscale="log")
    save_figure(fig, out / "curves.png", fontsize=8)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
