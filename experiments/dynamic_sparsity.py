"""Unstructured and dynamic sparse training at small scale: static random, SNIP, SET, RigL
and GMP against dense on the same GPT, data, seed and step budget.

Every transformer-block linear (attention qkv/proj, MLP fc/proj) is sparse at 80 % and at
90 % (ERK budget over those layers), plus RigL with a uniform budget; at 90 % the static /
SET / RigL comparison is repeated with a second seed. Writes ``results.md`` /
``results.csv`` (final validation loss, gap to dense, realised sparsity, wall time) and
``curves.png`` under ``--out``. Sparsity is *simulated* (dense matmuls with zeros).

    python experiments/dynamic_sparsity.py                 # ~30 min on 2 CPU cores
    python experiments/dynamic_sparsity.py --steps 2000 --dt 100 --sparsities 0.8 0.9

Literature direction (Evci et al. 2020): RigL <= SET < static random in loss at equal
sparsity, ERK better than uniform, GMP (dense for a while) close to or better than RigL.
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
DEFAULT_OUT = REPO / "experiments/results/dynamic_sparsity"
BLOCKS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"


def variants(sparsity: float, dt: int) -> dict[str, str]:
    """``{name: sparsity block}`` of the methods compared at one sparsity."""
    erk = f"sparsity: {sparsity}, distribution: erk"
    return {"static random": f"{{method: random, {erk}}}",
            "SNIP": f"{{method: snip, {erk}}}",
            "SET": f"{{method: set, {erk}, dt: {dt}, zeta: 0.3}}",
            "RigL": f"{{method: rigl, {erk}, dt: {dt}, alpha: 0.3, end_fraction: 0.75}}",
            "RigL (uniform)": (f"{{method: rigl, sparsity: {sparsity}, distribution: uniform, "
                               f"dt: {dt}, alpha: 0.3, end_fraction: 0.75}}"),
            "GMP": f"{{method: gmp, {erk}, dt: {dt}, end_fraction: 0.75}}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dt", type=int, default=25, help="steps between mask updates")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=[1],
                        help="seeds repeated for static / SET / RigL at the highest sparsity")
    parser.add_argument("--data", default=None, help="text file (default: tinyshakespeare)")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    data, data_overrides = text_data(args.data)
    base = ["train.eval_every=50", "checkpoint.every=100000", "logging.log_every=10",
            "logging.progress=lines", f"train.steps={args.steps}",
            f"optimizer.warmup_steps={max(1, args.steps // 12)}", *data_overrides,
            *args.override]
    runs = REPO / "runs" / "dynamic_sparsity"
    if Path(args.out).resolve() != DEFAULT_OUT.resolve():
        runs = runs / Path(args.out).name
    jobs = [("dense", None, None, 0)]
    top = max(args.sparsities)
    for s in args.sparsities:
        jobs += [(name, s, block, 0) for name, block in variants(s, args.dt).items()]
    for seed in args.extra_seeds:
        jobs += [("dense", None, None, seed)]
        jobs += [(name, top, variants(top, args.dt)[name], seed)
                 for name in ("static random", "SET", "RigL")]

    rows, curves = [], {}
    for name, sparsity, block, seed in jobs:
        tag = f"{name.replace(' ', '_').replace('(', '').replace(')', '')}_{sparsity}_s{seed}"
        run_dir = runs / tag
        rule = [f"rules=[{{path: '{BLOCKS}', sparsity: {block}}}]"] if block else []
        cfg = load_config(REPO / "configs" / "gpt_tiny.yaml",
                          [*base, f"train.seed={seed}", f"name=dynamic_{tag}",
                           f"run_dir={run_dir}", *rule])
        res = run(cfg)
        curves[(name, sparsity, seed)] = scalars(run_dir, "val/loss")
        rows.append({"method": name, "sparsity": sparsity, "seed": seed,
                     "val_loss": res["val_loss"],
                     "realised_sparsity": res.get("sparsity_sparsity"),
                     "wall_seconds": training_wall_seconds(run_dir, res["steps"])})
    dense = {r["seed"]: r["val_loss"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["gap_to_dense"] = r["val_loss"] - dense[r["seed"]]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    write_report(out, args, data, rows)
    plot(out, curves, args.sparsities)


def write_report(out: Path, args, data: str, rows: list[dict]) -> None:
    fmt = lambda v, p=4: "-" if v is None else f"{v:.{p}f}"
    cmd = " ".join(["python experiments/dynamic_sparsity.py", f"--steps {args.steps}",
                    f"--dt {args.dt}", "--sparsities " + " ".join(map(str, args.sparsities)),
                    *(f"--override {o}" for o in args.override)])
    lines = ["# Unstructured and dynamic sparse training, small GPT pre-training", "",
             f"Command: `{cmd}`  ",
             f"Data: `{Path(data).name}`; model `configs/gpt_tiny.yaml` (0.84M params); every "
             f"block linear sparse (embeddings, LayerNorms dense); {args.steps} steps, mask "
             f"updates every {args.dt} steps (RigL and GMP until 75 % of training). Simulated "
             "sparsity on 2 CPU cores.", "",
             "| sparsity | method | seeds | val loss | gap to dense (nats) | realised sparsity "
             "| wall s |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["sparsity"] or 0.0, r["method"]) for r in rows},
                  key=lambda k: (k[0], [r["method"] for r in rows].index(k[1])))
    for sparsity, method in keys:
        group = [r for r in rows if r["method"] == method and (r["sparsity"] or 0.0) == sparsity]
        mean = lambda key, g=group: _mean([r[key] for r in g])
        lines.append(f"| {sparsity or '-'} | {method} | {len(group)} | {fmt(mean('val_loss'))} "
                     f"| {fmt(mean('gap_to_dense'))} | {fmt(mean('realised_sparsity'), 3)} | "
                     f"{fmt(mean('wall_seconds'), 0)} |")
    lines += ["", "Means over the seeds listed (gap to dense: against the dense run of the same "
              "seed); per-run rows in `results.csv`; validation curves in `curves.png`. "
              "Realised sparsity: the size-weighted fraction of zeros of the masks in the last "
              "logged interval.", ""]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def plot(out: Path, curves: dict, sparsities: list[float]) -> None:
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5 * len(sparsities), 3.6),
                             squeeze=False)
    for ax, s in zip(axes[0], sparsities, strict=True):
        for (name, sparsity, seed), val in curves.items():
            if val and seed == 0 and sparsity in (s, None):
                ax.plot(*zip(*val, strict=True), marker="o", ms=3, label=name)
        ax.set(xlabel="step", ylabel="validation loss (nats)", title=f"{s:.0%} sparse (ERK)")
        ax.set_ylim(top=min(3.2, ax.get_ylim()[1]))
    save_figure(fig, out / "curves.png", fontsize=8)


if __name__ == "__main__":
    main()
