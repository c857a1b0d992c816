"""Post-training pruning of a trained dense GPT: magnitude, Wanda, SparseGPT and DSF.

A dense byte-level GPT is trained on tinyshakespeare (``configs/gpt_shakespeare.yaml``,
or ``--dense RUN``). Every transformer-block linear (attention qkv / proj, MLP fc / proj)
is then pruned one-shot by ``sparsejax prune``'s code path (``prune_run``), calibrated
sequentially on ``--calib-batches`` training batches, at

- 50 % unstructured: magnitude, Wanda, SparseGPT, DSF;
- 2:4: magnitude, Wanda, SparseGPT (DSF has no N:M form);
- 60 % and 70 % unstructured: magnitude, SparseGPT, DSF (DSF at equal non-zero count:
  its two factors together store the same number of weights).

Each calibrated method is run on two calibration streams (``--seeds``; magnitude uses no
calibration data, so once). Every seed-0 pruned model is then fine-tuned for
``--finetune-steps`` steps with its masks fixed (``train.init_from`` = the pruned run),
as is the dense model for the same steps (what the extra steps alone give).

Writes ``results.md`` / ``results.csv`` and ``losses.png`` under ``--out``.

    python experiments/posttrain_pruning.py                  # ~30 min on 2 CPU cores
    python experiments/posttrain_pruning.py --dense runs/my_dense --calib-batches 32

Directions from the papers: SparseGPT and Wanda well below magnitude at 50 % and 2:4,
SparseGPT at or below Wanda (Frantar & Alistarh 2023; Sun et al. 2023); DSF below
SparseGPT at equal non-zeros, the margin growing at 60-70 % (Boza & Macko 2025).
Sparsity is simulated (dense matmuls with zeros; DSF multiplies its factors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.posttrain import prune_run  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, text_data, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"
DEFAULT_OUT = "experiments/results/posttrain_pruning"
SETTINGS = [  # (label, prune_run pattern arguments, methods)
    ("50%", {"sparsity": 0.5}, ["magnitude", "wanda", "sparsegpt", "dsf"]),
    ("2:4", {"nm": (2, 4)}, ["magnitude", "wanda", "sparsegpt"]),
    ("60%", {"sparsity": 0.6}, ["magnitude", "sparsegpt", "dsf"]),
    ("70%", {"sparsity": 0.7}, ["magnitude", "sparsegpt", "dsf"]),
]
COLOURS = {"magnitude": "tab:gray", "wanda": "tab:orange", "sparsegpt": "tab:blue",
           "dsf": "tab:green"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default=None,
                        help="run dir of a trained dense GPT (default: train one here)")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--calib-batches", type=int, default=16,
                        help="calibration batches of 32 x 128 tokens (the command's "
                        "default is 32; 16 keeps this within ~30 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="calibration-data seeds")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--data", default=None, help="text file (default: tinyshakespeare)")
    parser.add_argument("--out", default=str(REPO / DEFAULT_OUT))
    args = parser.parse_args()

    data, data_overrides = text_data(args.data)
    runs = REPO / "runs" / "posttrain_pruning" / Path(args.out).name
    common = ["logging.progress=none", "checkpoint.every=100000", "train.eval_every=100000",
              *data_overrides]
    config = REPO / "configs" / "gpt_shakespeare.yaml"
    dense_dir = Path(args.dense) if args.dense else runs / "dense"
    if not args.dense:
        print(f"training the dense model ({args.dense_steps} steps) in {dense_dir}", flush=True)
        run(load_config(config, [*common, f"train.steps={args.dense_steps}",
                                 "name=posttrain_dense", f"run_dir={dense_dir}"]),
            verbose=False)

    rows, pruned_dirs = [], {}
    for label, pattern, names in SETTINGS:
        for method in names:
            for seed in args.seeds if method != "magnitude" else args.seeds[:1]:
                slug = f"{method}_{label.replace('%', 'pct').replace(':', 'of')}_s{seed}"
                out = runs / slug
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                report = prune_run(dense_dir, out, method=method, layers=BLOCK_LINEARS,
                                   calib_batches=args.calib_batches, calib_seed=seed,
                                   progress=None, **pattern)
                seconds = time.perf_counter() - start
                errors = [r["rel_error"] for r in report["per_layer"]]
                rows.append({"setting": label, "method": method, "calib_seed": seed,
                             "density": report["density"],
                             "dense_val_loss": report["before"]["loss"],
                             "pruned_val_loss": report["after"]["loss"],
                             "mean_layer_rel_error": float(np.mean(errors)),
                             "prune_seconds": report["prune_seconds"],
                             "wall_seconds": seconds, "finetuned_val_loss": None})
                print(f"{label:4s} {method:9s} seed {seed}: val loss "
                      f"{report['before']['loss']:.4f} -> {report['after']['loss']:.4f} "
                      f"(density {report['density']:.3f}, mean layer error "
                      f"{np.mean(errors):.4f}, {seconds:.0f} s)", flush=True)
                if seed == args.seeds[0]:
                    pruned_dirs[(label, method)] = out

    finetune = [*common, f"train.steps={args.finetune_steps}",
                f"optimizer.lr={args.finetune_lr}",
                f"optimizer.warmup_steps={max(1, args.finetune_steps // 10)}"]
    dense_cont = runs / "dense_finetuned"
    shutil.rmtree(dense_cont, ignore_errors=True)
    dense_ft = run(load_config(config, [*finetune, f"train.init_from={dense_dir}",
                                        "name=dense_finetuned", f"run_dir={dense_cont}"]),
                   verbose=False)["val_loss"]
    print(f"dense, {args.finetune_steps} more steps: {dense_ft:.4f}", flush=True)
    for (label, method), pruned in pruned_dirs.items():
        ft_dir = runs / f"{pruned.name}_ft"
        shutil.rmtree(ft_dir, ignore_errors=True)
        results = run(load_config(pruned / "config.yaml", [
            *finetune, f"train.init_from={pruned}", f"name={ft_dir.name}",
            f"run_dir={ft_dir}"]), verbose=False)
        for row in rows:
            if (row["setting"], row["method"], row["calib_seed"]) == (label, method,
                                                                       args.seeds[0]):
                row["finetuned_val_loss"] = results["val_loss"]
        print(f"{label:4s} {method:9s} fine-tuned: {results['val_loss']:.4f}", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "results.csv", rows)
    dense_loss = rows[0]["dense_val_loss"]
    write_report(out_dir, rows, dense_loss, dense_ft, args, describe_dense(dense_dir))
    plot(out_dir / "losses.png", rows, dense_loss, dense_ft)
    print(f"written {out_dir}/results.md, results.csv, losses.png")


def summary(rows: list[dict]) -> list[dict]:
    """One row per (setting, method): the mean and spread over calibration seeds."""
    out = []
    for label, _, names in SETTINGS:
        for method in names:
            mine = [r for r in rows if (r["setting"], r["method"]) == (label, method)]
            losses = [r["pruned_val_loss"] for r in mine]
            out.append({"setting": label, "method": method, "density": mine[0]["density"],
                        "pruned": float(np.mean(losses)),
                        "spread": float(np.ptp(losses)) if len(losses) > 1 else None,
                        "seeds": len(losses),
                        "error": float(np.mean([r["mean_layer_rel_error"] for r in mine])),
                        "finetuned": next(r["finetuned_val_loss"] for r in mine
                                          if r["finetuned_val_loss"] is not None),
                        "seconds": float(np.mean([r["prune_seconds"] for r in mine]))})
    return out


def describe_dense(run_dir: Path) -> dict[str, str]:
    """What the report says about the dense run (read from its config and results)."""
    from sparsejax.runs import read_saved_config

    cfg = read_saved_config(run_dir / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text())
    m = cfg.model
    return {"model": f"{m.n_layer} layers, {m.n_embd} wide, {results['params'] / 1e6:.2f}M "
                     "parameters",
            "steps": str(cfg.train.steps), "data": Path(cfg.data.path or "stdlib").name,
            "layers": str(4 * m.n_layer),
            "batch": f"{cfg.data.batch_size} x {m.block_size}"}


def write_report(out_dir: Path, rows: list[dict], dense_loss: float, dense_ft: float,
                 args: argparse.Namespace, dense: dict[str, str]) -> None:
    lines = [
        "# Post-training pruning of a dense GPT: magnitude, Wanda, SparseGPT, DSF", "",
        "`python experiments/posttrain_pruning.py "
        + " ".join(a for a in sys.argv[1:]) + "`", "",
        f"Byte-level GPT ({dense['model']}) trained dense for {dense['steps']} steps on "
        f"{dense['data']}; the {dense['layers']} transformer-block linears pruned one-shot, "
        f"calibrated sequentially on {args.calib_batches} training batches "
        f"({dense['batch']} tokens each), calibration seeds {args.seeds}; then "
        f"{args.finetune_steps} steps of masked fine-tuning (lr {args.finetune_lr:g}). "
        "Validation loss in nats per byte on the fixed validation batches. Sparsity is "
        "simulated (dense matmuls with zeros; DSF multiplies its two factors).", "",
        f"Dense: **{dense_loss:.4f}**; dense trained {args.finetune_steps} more steps: "
        f"**{dense_ft:.4f}**.", "",
        "| setting | method | density | val loss after pruning (mean over seeds) | "
        "seed spread | mean layer output error | after fine-tuning | prune time (s) |",
        "|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        spread = "-" if s["spread"] is None else f"{s['spread']:.4f}"
        lines.append(f"| {s['setting']} | {s['method']} | {s['density']:.3f} | "
                     f"{s['pruned']:.4f} | {spread} | {s['error']:.4f} | "
                     f"{s['finetuned']:.4f} | {s['seconds']:.1f} |")
    lines += ["", "Mean layer output error: `||X W - X W^||^2 / ||X W||^2` on each layer's "
              "own calibration inputs, averaged over the layers. Density: stored weights "
              "over the pruned layers' size (per-column budgets round to whole weights for "
              "magnitude and Wanda).", "", "![losses](losses.png)", ""]
    (out_dir / "results.md").write_text("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


def plot(path: Path, rows: list[dict], dense_loss: float, dense_ft: float) -> None:
    stats = summary(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, key, title in ((axes[0], "pruned", "right after pruning"),
                           (axes[1], "finetuned", "after masked fine-tuning")):
        labels = [label for label, _, _ in SETTINGS]
        width = 0.2
        for j, method in enumerate(COLOURS):
            xs = [i + (j - 1.5) * width for i, label in enumerate(labels)
                  if any((s["setting"], s["method"]) == (label, method) for s in stats)]
            ys = [s[key] for label in labels for s in stats
                  if (s["setting"], s["method"]) == (label, method)]
            ax.bar(xs, ys, width, label=method, color=COLOURS[method])
        ax.axhline(dense_loss if key == "pruned" else dense_ft, color="k", ls="--",
                   label="dense" if key == "pruned" else "dense, same extra steps")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(min(dense_loss, dense_ft) - 0.05,
                    max(s[key] for s in stats) + 0.05)
        ax.set_title(f"validation loss {title}")
        ax.set_ylabel("nats / byte")
    save_figure(fig, path, fontsize=8)


if __name__ == "__main__":
    main()
