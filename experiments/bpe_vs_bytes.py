"""Byte-level BPE vs raw bytes on tinyshakespeare, compared on one scale (validation bits
per byte) at equal training time.

    python experiments/bpe_vs_bytes.py                 # 600 steps each, ~10 min on 2 cores
    python experiments/bpe_vs_bytes.py --steps 5000 --extra model.n_layer=6 model.n_embd=384

Trains ``configs/gpt_shakespeare.yaml`` (bytes) and ``configs/gpt_shakespeare_bpe.yaml``
(the committed 2048-token BPE preparation of the same file) with the same model, batch and
schedule, evaluating every ``--eval-every`` steps. The BPE run's validation bpb is total nats
over the bytes of text its targets stand for, so the two are on one scale. Equal training
time: the BPE curve is read (linear interpolation in wall time) at the byte run's final
training time. Writes ``results.md``, ``curves.csv`` and ``bpb_vs_time.png`` under
``experiments/results/bpe_vs_bytes/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import events, save_figure, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "bpe_vs_bytes"
CONFIGS = {"bytes": "gpt_shakespeare.yaml", "bpe": "gpt_shakespeare_bpe.yaml"}


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(step, seconds since the first logged step, val bpb)`` of a run."""
    start = events(run_dir, "train/loss")[0].wall_time
    return [(e.step, e.wall_time - start, e.value) for e in events(run_dir, "val/bpb")]


def main() -> None:
    from sparsejax.config import load_config
    from sparsejax.train import run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for both runs")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bpe_vs_bytes")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results, curves = {}, {}
    for name, config in CONFIGS.items():
        run_dir = args.runs / name
        cfg = load_config(REPO / "configs" / config,
                          [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
                           "logging.progress=none", f"run_dir={run_dir}", *args.extra])
        results[name] = run(cfg, verbose=False)
        curves[name] = curve(run_dir)
        print(name, {k: results[name][k] for k in ("val_loss", "val_bpb", "tokens_per_sec")})
    budget = curves["bytes"][-1][1]
    bpe_steps, bpe_time, bpe_bpb = (np.asarray(c) for c in zip(*curves["bpe"], strict=True))
    at_budget = float(np.interp(budget, bpe_time, bpe_bpb))
    rows = [{"run": n, "step": s, "seconds": round(t, 2), "val_bpb": v}
            for n, c in curves.items() for s, t, v in c]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "curves.csv", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, c in curves.items():
        ax.plot([t for _, t, _ in c], [v for _, _, v in c], marker="o", label=name)
    ax.axvline(budget, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="training seconds", ylabel="validation bits per byte",
           title="tinyshakespeare: BPE (2048) vs bytes")
    save_figure(fig, args.out / "bpb_vs_time.png")
    b, p = results["bytes"], results["bpe"]
    text = "\n".join([
        "# BPE vs bytes on tinyshakespeare, bits per byte at equal training time", "",
        f"Command: `python experiments/bpe_vs_bytes.py --steps {args.steps} --eval-every "
        f"{args.eval_every}{' --extra ' + ' '.join(args.extra) if args.extra else ''}`", "",
        "Same model (configs/gpt_shakespeare*.yaml: 4 layers, width 128, block 128), batch 32, "
        "schedule; the BPE run reads 2048-token byte-level BPE (data/shakespeare_bpe, 2.88 "
        "bytes/token on train), so each step sees ~2.9x the text. Validation bpb = total "
        "nats / ln 2 / bytes of text of the targets.", "",
        "| run | steps | training s | val loss (nats/token) | val bpb | tokens/s |",
        "|---|---|---|---|---|---|",
        f"| bytes | {args.steps} | {budget:.0f} | {b['val_loss']:.4f} | {b['val_bpb']:.4f} | "
        f"{b['tokens_per_sec']:,.0f} |",
        f"| BPE 2048 | {args.steps} | {curves['bpe'][-1][1]:.0f} | {p['val_loss']:.4f} | "
        f"{p['val_bpb']:.4f} | {p['tokens_per_sec']:,.0f} |", "",
        f"At the byte run's training time ({budget:.0f} s) the BPE run's validation bpb is "
        f"**{at_budget:.4f}** against **{b['val_bpb']:.4f}** for bytes ("
        + ("interpolated between its evaluations" if bpe_time[-1] >= budget else
           f"the BPE run finished sooner, at {bpe_time[-1]:.0f} s: its final value, with "
           "less training time") + ").", "",
        "![bpb vs time](bpb_vs_time.png)", ""])
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
