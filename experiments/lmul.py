"""L-Mul (multiplication by integer addition): the paper's numerical claims, and a GPT
with L-Mul attention against float32 and FP8 attention.

1. On 10^6 pairs of standard Gaussians: the relative error ``|approx - x y| / |x y|`` of
   L-Mul at 2-5 mantissa bits, of an exact product of operands rounded to the same bits
   (float32's exponent range, the result rounded again), and of FP8 products (operands
   and result round-tripped through E4M3 / E5M2, no scaling). The paper (Luo & Sun 2024):
   L-Mul with a 4-bit mantissa is about as precise as E4M3 multiplication, and with 3 bits
   more precise than E5M2.
2. A character-level GPT (4 x 4 heads x 128, tinyshakespeare) trained ``--steps`` steps
   with its attention products (``q k^T`` and ``p v``) in float32, FP8 E4M3 (per-token
   scales) and L-Mul with 4 and 3 mantissa bits (straight-through gradients); validation
   loss after the same budget, and the step time of each (simulation: L-Mul is emulated
   with integer operations, so it is slower here, not faster).

    python experiments/lmul.py                 # ~15 min on 2 CPU cores
    python experiments/lmul.py --steps 1000 --batch-size 32

Writes ``results.md``, ``results.csv`` and ``curves.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.numerics import lmul, round_mantissa  # noqa: E402
from sparsejax.quant import FP8_FORMATS  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, scalars, training_wall_seconds, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt_sste_char.yaml"
ATTN = "blocks/\\d+/attn"


def relative_errors(pairs: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal(pairs).astype(np.float32) for _ in range(2))
    exact = x.astype(np.float64) * y.astype(np.float64)

    def row(name: str, approx: np.ndarray) -> dict:
        rel = np.abs(approx.astype(np.float64) - exact) / np.abs(exact)
        rel = rel[np.isfinite(rel)]
        return {"multiplier": name, "mean_rel_error": float(rel.mean()),
                "median_rel_error": float(np.median(rel)),
                "p99_rel_error": float(np.quantile(rel, 0.99))}

    rows = []
    lmul_jit = jax.jit(lmul, static_argnums=2)
    for m in (2, 3, 4, 5):
        rows.append(row(f"L-Mul, {m}-bit mantissa", np.asarray(lmul_jit(x, y, m))))
        xr, yr = round_mantissa(x, m), round_mantissa(y, m)
        rows.append(row(f"exact product, {m}-bit mantissa",
                        np.asarray(round_mantissa(xr * yr, m))))
    for fmt, dtype in FP8_FORMATS.items():
        xq, yq = x.astype(dtype).astype(np.float32), y.astype(dtype).astype(np.float32)
        rows.append(row(f"FP8 {fmt.upper()} (operands and product)",
                        (xq * yq).astype(dtype).astype(np.float32)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "experiments/results/lmul"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    errors = relative_errors(args.pairs, seed=0)
    write_csv(out / "errors.csv", errors)
    for r in errors:
        print(f"{r['multiplier']:40s} mean {r['mean_rel_error']:.4f} median "
              f"{r['median_rel_error']:.4f}", flush=True)

    runs = REPO / "runs" / "lmul"
    arms = {"float32": "rules=[]",
            "FP8 E4M3": f"rules=[{{path: '{ATTN}', attention: {{method: fp8, fmt: e4m3}}}}]",
            "L-Mul 4-bit": f"rules=[{{path: '{ATTN}', attention: {{method: lmul, "
                           f"mantissa_bits: 4}}}}]",
            "L-Mul 3-bit": f"rules=[{{path: '{ATTN}', attention: {{method: lmul, "
                           f"mantissa_bits: 3}}}}]"}
    rows, curves = [], {}
    for arm, rule in arms.items():
        slug = arm.lower().replace(" ", "_").replace("-", "")
        run_dir = runs / f"{slug}_n{args.steps}_b{args.batch_size}"
        if (run_dir / "results.json").is_file():
            results = json.loads((run_dir / "results.json").read_text())
        else:
            print(f"{arm}: training", flush=True)
            overrides = [rule, f"train.steps={args.steps}",
                         f"data.batch_size={args.batch_size}",
                         f"optimizer.warmup_steps={min(100, args.steps // 10)}",
                         f"train.eval_every={max(args.steps // 6, 1)}",
                         "checkpoint.every=100000", "logging.progress=none",
                         f"name={slug}", f"run_dir={run_dir}"]
            results = run(load_config(CONFIG, overrides), verbose=False)
        curves[arm] = scalars(run_dir, "val/loss")
        rows.append({"attention products": arm, "steps": results["steps"],
                     "val_loss": results["val_loss"],
                     "seconds_per_step": training_wall_seconds(run_dir, results["steps"])
                     / results["steps"]})
    base = rows[0]
    write_csv(out / "results.csv", rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=arm, ms=3)
    ax.set_xlabel("training steps")
    ax.set_ylabel("val loss (nats / char)")
    save_figure(fig, out / "curves.png", fontsize=8)

    lines = ["# L-Mul: multiplication by integer addition", "",
             f"Command: `python experiments/lmul.py --pairs {args.pairs} --steps {args.steps} "
             f"--batch-size {args.batch_size}`", "",
             f"## Relative error of one product, {args.pairs:,} pairs of N(0, 1)", "",
             "| multiplier | mean | median | 99th percentile |", "|---|---|---|---|"]
    lines += [f"| {r['multiplier']} | {r['mean_rel_error']:.4f} | "
              f"{r['median_rel_error']:.4f} | {r['p99_rel_error']:.4f} |" for r in errors]
    lines += ["", f"## GPT with its attention products in each arithmetic ({args.steps} steps,"
              f" batch {args.batch_size}, character-level tinyshakespeare, "
              f"jax {jax.__version__}, {jax.devices()[0].platform})", "",
              "| attention products | val loss | vs float32 | s / step | step time vs float32 |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['attention products']} | {r['val_loss']:.4f} | "
              f"{r['val_loss'] - base['val_loss']:+.4f} | {r['seconds_per_step']:.3f} | "
              f"{r['seconds_per_step'] / base['seconds_per_step']:.2f} |" for r in rows]
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
