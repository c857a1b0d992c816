"""1-bit signed cuts against absmax round-to-nearest and truncated SVD, at equal storage.

Every transformer-block linear of a trained character-level GPT (4 x 4 heads x 128,
tinyshakespeare; ``configs/gpt_sste_char.yaml`` without its sparsity rule, or
``--source RUN``) is compressed by ``sparsejax compress``'s code path at 0.5, 1, 2 and 4
bits per weight with:

- ``signed_cuts``: ``sum_j c_j s_j t_j^T``, ``w (in + out)`` sign bits + ``w`` 16-bit
  coefficients (Riasanovsky & El Kazdadi 2024);
- ``rtn``: absmax round-to-nearest per output column at ``floor(bits)`` bits plus a
  16-bit scale per column (no 0.5-bit form);
- ``rtn_minmax``: asymmetric min/max round-to-nearest per output column, ``2^b`` levels
  with a 16-bit scale and zero point per column;
- ``svd``: truncated SVD with 16-bit factors at the same storage.

Reported: the mean relative Frobenius error over the layers, and the validation loss of
the compressed model. Writes ``results.md``, ``results.csv`` and ``loss_vs_bits.png``.

    python experiments/signed_cuts.py                       # ~15 min on 2 CPU cores
    python experiments/signed_cuts.py --source runs/my_gpt --bits 0.25 0.5 1 2
    python experiments/signed_cuts.py --methods rtn_minmax   # one method; the other rows
                                                             # are kept from results.csv
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.compress import compress_run  # noqa: E402
from sparsejax.config import load_config  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_csv, save_figure, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("signed_cuts", "rtn", "rtn_minmax", "svd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None,
                        help="run dir of a trained GPT (default: train one, 1000 steps)")
    parser.add_argument("--bits", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--layers", default=r"blocks/\d+/(attn|mlp)/.*")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods to (re)run; rows of the others at these --bits are "
                             "kept from an existing results.csv of the same source")
    parser.add_argument("--out", default=str(REPO / "experiments/results/signed_cuts"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = REPO / "runs" / "signed_cuts"
    source = Path(args.source) if args.source else runs / "dense"
    if not args.source and not (source / "results.json").is_file():
        print(f"training the source GPT in {source}", flush=True)
        run(load_config(REPO / "configs/gpt_sste_char.yaml",
                        ["rules=[]", "name=signed_cuts_dense", f"run_dir={source}",
                         "checkpoint.every=100000", "logging.progress=none"]), verbose=False)

    resolved = source.resolve()
    source_name = str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved)
    numbers = ("bits_budget", "bits_per_weight", "mean_rel_error", "val_loss", "dense_val_loss")
    rows = [r for r in read_csv(out / "results.csv", floats=numbers)
            if r["method"] not in args.methods and r["bits_budget"] in args.bits
            and r.get("source") == source_name]
    for method in args.methods:
        for bits in args.bits:
            if method.startswith("rtn") and bits < 1:
                continue
            target = runs / f"{method}_{bits:g}"
            shutil.rmtree(target, ignore_errors=True)
            report = compress_run(source, target, method=method, bits=bits,
                                  layers=args.layers, progress=None)
            errors = [layer["rel_error"] for layer in report["per_layer"]]
            rows.append({"method": method, "bits_budget": bits,
                         "bits_per_weight": report["bits_per_weight"],
                         "mean_rel_error": float(np.mean(errors)),
                         "val_loss": report["after"]["loss"],
                         "dense_val_loss": report["before"]["loss"],
                         "source": source_name})
            print(f"{method:12s} {bits:4g} bits: {report['bits_per_weight']:.3f} stored, "
                  f"error {np.mean(errors):.4f}, val loss {report['after']['loss']:.4f}",
                  flush=True)
    rows.sort(key=lambda r: (r["bits_budget"], METHODS.index(r["method"])))
    write_csv(out / "results.csv", rows)
    dense = rows[0]["dense_val_loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [(r["bits_per_weight"], r["val_loss"]) for r in rows if r["method"] == method]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), "o-", label=method)
    ax.axhline(dense, color="black", ls="--", label="uncompressed")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (stored)")
    ax.set_ylabel("val loss (nats / char)")
    ax.set_ylim(top=min(ax.get_ylim()[1], dense + 2.5))
    save_figure(fig, out / "loss_vs_bits.png", fontsize=8)

    lines = ["# Signed cuts vs round-to-nearest vs truncated SVD at equal storage", "",
             f"Command: `python experiments/signed_cuts.py --bits "
             f"{' '.join(f'{b:g}' for b in args.bits)}"
             f"{f' --source {args.source}' if args.source else ''}`", "",
             f"Source: `{source_name}`"
             f" ({json.loads((source / 'results.json').read_text())['steps']} steps), "
             f"uncompressed val loss {dense:.4f}; layers `{args.layers}` (weights only; "
             "simulated: the approximations are stored as dense kernels).", "",
             "| bits budget | method | bits / weight stored | mean relative error | "
             "val loss |", "|---|---|---|---|---|"]
    for bits in args.bits:
        for r in (r for r in rows if r["bits_budget"] == bits):
            lines.append(f"| {bits:g} | {r['method']} | {r['bits_per_weight']:.3f} | "
                         f"{r['mean_rel_error']:.4f} | {r['val_loss']:.4f} |")
    lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
