"""Low-precision pre-training sweep: the denoising affine transform (DAT) against plain
absmax-STE at A1W1, A2W2, A4W4, A4W1, ternary weights (A8) and A4W1 + 2:4, plus the
full-precision baseline, all on the same GPT, data, seed and step budget.

Every transformer-block linear (attention qkv/proj, MLP fc/proj) has its weights and input
activations quantised by path rule, sub-channel blocks of 128; embeddings, LayerNorms and
the tied head stay full precision. DAT uses the paper's forms (docs/methods.md §3): affine for
1/2/4 bits, linear for ternary and under 2:4 sparsity (pruned by STE, the paper's
stopped-gradient noise). Quantisation is simulated (float32 arithmetic).

Writes ``results.md`` / ``results.csv`` (final validation loss, NaN/divergence, wall time)
and ``curves.png`` (validation loss per setting, DAT solid, STE dashed).

    python experiments/low_precision_sweep.py                  # ~15 min on 2 CPU cores
    python experiments/low_precision_sweep.py --steps 2000 --override data.batch_size=32

Paper's claim (Ye et al. 2024): at 1-2 bits the denoising transform converges where plain
STE is unstable or much worse.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.errors import NonFiniteLossError  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, scalars, text_data, training_wall_seconds, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINEARS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"
# setting -> (activation bits, weight bits, weight form for DAT, 2:4 sparsity)
SETTINGS = {
    "A1W1": (1, 1, "affine", False),
    "A2W2": (2, 2, "affine", False),
    "A4W4": (4, 4, "affine", False),
    "A4W1": (4, 1, "affine", False),
    "A8W1.58": (8, 1.5, "linear", False),
    "A4W1+2:4": (4, 1, "linear", True),
}
METHODS = ("absmax_ste", "dat")


def rule(setting: str, method: str) -> list[str]:
    a_bits, w_bits, w_form, sparse = SETTINGS[setting]
    affine = str(w_form == "affine").lower()
    weights = f"{{method: {method}, bits: {w_bits}, affine: {affine}}}"
    activations = f"{{method: {method}, bits: {a_bits}, affine: true}}"
    sparsity = "sparsity: {method: ste, n: 2, m: 4}, " if sparse else ""
    return [f"rules=[{{path: '{LINEARS}', {sparsity}"
            f"quant: {{weights: {weights}, activations: {activations}}}}}]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="text file (default: tinyshakespeare)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--override", action="append", default=["data.batch_size=16"],
                        help="dotted config override for every run (repeatable; default "
                             "data.batch_size=16)")
    parser.add_argument("--out", default=str(REPO / "experiments/results/low_precision_sweep"))
    args = parser.parse_args()

    data, data_overrides = text_data(args.data)
    base = [f"train.steps={args.steps}", f"train.eval_every={max(10, args.steps // 10)}",
            f"optimizer.warmup_steps={max(1, args.steps // 12)}", "checkpoint.every=100000",
            "logging.log_every=10", "logging.progress=lines", f"train.seed={args.seed}",
            *data_overrides, *args.override]
    runs = REPO / "runs" / "low_precision_sweep" / Path(args.out).name
    variants = [("full precision", "fp32", [])] + [
        (setting, method, rule(setting, method))
        for setting in args.settings for method in METHODS]
    rows, curves = [], {}
    for setting, method, overrides in variants:
        slug = f"{setting}_{method}".replace(":", "").replace(" ", "_")
        run_dir = runs / slug
        cfg = load_config(REPO / "configs" / "gpt_tiny.yaml",
                          [*base, f"name=lp_{slug}", f"run_dir={run_dir}", *overrides])
        status = "ok"
        try:
            res = run(cfg)
            val_loss, steps = res["val_loss"], res["steps"]
        except NonFiniteLossError as err:
            status, val_loss = f"NaN/Inf ({str(err).splitlines()[0][:60]})", math.nan
            steps = max((s for s, _ in scalars(run_dir, "train/loss")), default=0)
        val = scalars(run_dir, "val/loss")
        curves[(setting, method)] = val
        if status == "ok" and len(val) > 2 and val[-1][1] > min(v for _, v in val) + 0.1:
            status = "diverging (val loss 0.1 above its best)"
        rows.append({"setting": setting, "method": method, "val_loss": val_loss,
                     "best_val_loss": min((v for _, v in val), default=math.nan),
                     "status": status,
                     "wall_seconds": training_wall_seconds(run_dir, steps) if steps else 0.0})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    fp = next(r["val_loss"] for r in rows if r["method"] == "fp32")
    cmd = " ".join(["python experiments/low_precision_sweep.py", f"--steps {args.steps}",
                    f"--seed {args.seed}", *(f"--override {o}" for o in args.override),
                    *([f"--data {args.data}"] if args.data else [])])
    lines = ["# Low-precision sweep: denoising affine transform vs absmax-STE", "",
             f"Command: `{cmd}`  ",
             f"Data: `{Path(data).name}`; model "
             "`configs/gpt_tiny.yaml` (0.84M params), every block linear's weights and input "
             f"activations quantised (blocks of 128); {args.steps} steps, seed {args.seed}. "
             "Simulated quantisation on 2 CPU cores.", "",
             "| setting | method | final val loss | gap to full precision | best val loss | "
             "status | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = r["val_loss"] - fp
        lines.append(f"| {r['setting']} | {r['method']} | {r['val_loss']:.4f} | "
                     f"{gap:+.4f} | {r['best_val_loss']:.4f} | {r['status']} | "
                     f"{r['wall_seconds']:.0f} |")
    lines += ["", "Curves in `curves.png` (DAT solid, absmax-STE dashed).", ""]
    (out / "results.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = dict(zip(["full precision", *SETTINGS], plt.cm.tab10.colors, strict=False))
    for (setting, method), val in curves.items():
        if val:
            ax.plot(*zip(*val, strict=True), color=colors[setting], marker="o", ms=2,
                    ls="--" if method == "absmax_ste" else "-",
                    label=setting if method == "fp32" else f"{setting} {method}")
    ax.set(xlabel="step", ylabel="validation loss (nats)",
           title="low-precision GPT pre-training: DAT (solid) vs absmax-STE (dashed)")
    save_figure(fig, out / "curves.png", fontsize=7, ncol=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
