"""Dense baselines of the shipped configs: train each (or reuse a finished run), then write
a results table and learning curves read back from the runs' TensorBoard event files.

    python experiments/pretrain_baseline.py                # ~12 min on 2 CPU cores
    python experiments/pretrain_baseline.py configs/gpt_tiny.yaml train.steps=5000  # real scale

Writes ``experiments/results/pretrain_baseline/{results.md,results.csv,curves.png}``.
Runs live in ``runs/pretrain_baseline/<config>``; re-running reuses finished runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, scalar_events, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/gpt_tiny.yaml", "configs/gpt_shakespeare.yaml",
                   "configs/mlp_digits.yaml"]


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in evs] for tag, evs in scalar_events(run_dir).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--override", action="append", default=[],
                        help="dotted override applied to every config (repeatable)")
    parser.add_argument("--out", default=str(REPO / "experiments/results/pretrain_baseline"))
    args = parser.parse_args()

    rows, all_curves = [], {}
    for path in args.configs:
        cfg = load_config(REPO / path, args.override)
        cfg.run_dir = str(REPO / "runs" / "pretrain_baseline" / cfg.name)
        cfg.logging.progress = "lines"
        res = run(cfg)
        all_curves[cfg.name] = curves(Path(cfg.run_dir))
        if "val_accuracy" in res:
            metric, value, baseline = ("val accuracy", res["val_accuracy"],
                                       f"majority class {res['majority_class_accuracy']:.3f}")
        else:
            bits = "bpb" if "val_bpb" in res else "bits_per_token"
            metric, value = f"val {bits}", res[f"val_{bits}"]
            baseline = f"unigram entropy {res[f'unigram_entropy_{bits}']:.3f}"
        rate = res.get("tokens_per_sec") or res.get("samples_per_sec")
        rows.append({"config": path, "params": res["params"], "steps": res["steps"],
                     "metric": metric, "value": round(value, 4), "baseline": baseline,
                     "throughput_per_s": round(rate), "command": f"sparsejax train {path}"})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    lines = ["# Dense baselines of the shipped configs", "",
             "Command: `" + " ".join(
                 ["python experiments/pretrain_baseline.py",
                  *(args.configs if args.configs != DEFAULT_CONFIGS else []),
                  *(f"--override {o}" for o in args.override)]) + "`", "",
             "| config | params | steps | metric | value | baseline | throughput/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| `{r['config']}` | {r['params']:,} | {r['steps']} | {r['metric']} | "
              f"{r['value']} | {r['baseline']} | {r['throughput_per_s']:,} |" for r in rows]
    lines += ["", "Throughput: tokens/s (GPT) or samples/s (MLP) over training intervals, "
              "2 CPU cores. Curves: `curves.png`.", ""]
    (out / "results.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, len(all_curves), figsize=(4.5 * len(all_curves), 3.4))
    for ax, (name, c) in zip(list(getattr(axes, "flat", [axes])), all_curves.items(),
                             strict=True):
        for tag in ("train/loss", "val/loss"):
            if tag in c:
                steps, values = zip(*c[tag], strict=True)
                ax.plot(steps, values, label=tag, marker="o" if tag.startswith("val") else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
    save_figure(fig, out / "curves.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
