"""Learned 2:4 masks (MaskLLM) against one-shot magnitude pruning of a trained dense GPT.

Starting from one dense checkpoint (trained here by ``sparsejax train`` unless ``--dense RUN`` is
given), every block linear (attention and FFN) is made 2:4 sparse three ways:

(a) one-shot: the magnitude mask of the dense weights, no training (evaluated as is);
(b) magnitude + S-STE fine-tuning of all weights for ``--steps`` steps;
(c) MaskLLM: the weights frozen, only the mask logits trained for ``--steps`` steps
    (magnitude prior, tau 4 -> 0.05, kappa 100 -> 500, regulariser 1e-5 -> 0), once per
    ``--mask-lr-mults`` value (the logits' learning rate relative to ``--lr``; the
    reference recipe uses 10);

and, as the reference for what the extra steps alone give, the dense model trained on for
the same steps (no pruning).

Writes ``results.md`` / ``results.csv`` and ``curves.png`` (validation loss of (b) and (c)
against the dense and one-shot levels). For every pruned model the table also gives the
realised sparsity of its sparse layers and the share of 2:4 groups whose final mask differs
from the magnitude mask of the dense weights (0 for one-shot by construction).

    python experiments/maskllm_vs_oneshot.py                 # ~16 min on 2 CPU cores
    python experiments/maskllm_vs_oneshot.py --dense runs/my_dense --steps 2000

Paper's claim (Fang et al., NeurIPS 2024): learned masks beat one-shot magnitude masks.
Sparsity is simulated (dense matmuls with zeros).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.evaluation import evaluate_model  # noqa: E402
from sparsejax.nn import named_layers, sparse_layers  # noqa: E402
from sparsejax.runs import init_model, load_model  # noqa: E402
from sparsejax.sparsity import nm_mask  # noqa: E402
from sparsejax.train import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figure, scalars, text_data, training_wall_seconds, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"
DEFAULT_OUT = "experiments/results/maskllm_vs_oneshot"
NO_MASK_STATS = dict.fromkeys(("sparsity", "groups_changed", "groups_changed_at_start"))


def mask_statistics(model, dense_model) -> dict[str, float]:
    """Realised sparsity of ``model``'s sparse layers (inference weights) and the share of
    their N:M groups whose kept set differs from the magnitude mask of the same layer of
    ``dense_model``, both over all sparse layers together."""
    dense = dict(named_layers(dense_model))
    zeros = size = changed = groups = 0
    for path, layer in sparse_layers(model):
        n, m = layer.sparsity.spec.n, layer.sparsity.spec.m
        kept = np.asarray(layer.effective_kernel()) != 0  # (in, out)
        prior = np.asarray(nm_mask(dense[path].kernel[...], n, m))
        differs = (kept != prior).reshape(kept.shape[0] // m, m, -1).any(axis=1)
        zeros, size = zeros + int((~kept).sum()), size + kept.size
        changed, groups = changed + int(differs.sum()), groups + differs.size
    return {"sparsity": zeros / size, "groups_changed": changed / groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default=None,
                        help="run dir of a trained dense GPT (default: train one here)")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of (b), (c)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of (b) and (c)")
    parser.add_argument("--mask-lr-mults", type=float, nargs="+", default=[1.0, 10.0],
                        help="learning-rate multipliers of the mask logits, one run each")
    parser.add_argument("--paths", default=BLOCK_LINEARS, help="regex of the sparse layers")
    parser.add_argument("--data", default=None, help="text file (default: tinyshakespeare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[],
                        help="dotted config override for every run (repeatable)")
    parser.add_argument("--out", default=str(REPO / DEFAULT_OUT))
    args = parser.parse_args()

    data, data_overrides = text_data(args.data)
    runs = REPO / "runs" / "maskllm_vs_oneshot" / Path(args.out).name
    common = ["logging.progress=lines", "checkpoint.every=100000", *data_overrides,
              f"train.seed={args.seed}", *args.override]
    tiny = REPO / "configs" / "gpt_tiny.yaml"

    dense_dir = Path(args.dense) if args.dense else runs / "dense"
    if not args.dense:
        run(load_config(tiny, [*common, f"train.steps={args.dense_steps}", "name=mask_dense",
                               f"run_dir={dense_dir}", "train.eval_every=100000"]))

    finetune = [*common, f"train.steps={args.steps}", f"train.init_from={dense_dir}",
                f"optimizer.lr={args.lr}", f"optimizer.warmup_steps={max(1, args.steps // 10)}",
                "train.eval_every=25", "logging.log_every=25"]
    rule = lambda spec: f"rules=[{{path: '{args.paths}', sparsity: {spec}}}]"
    variants = [  # (name, run name, rules)
        ("dense, trained on", "dense_continued", "rules=[]"),
        ("one-shot magnitude", "one_shot", rule("{method: ste}")),
        ("magnitude + S-STE fine-tune", "sste", rule("{method: sste}")),
        *((f"MaskLLM (frozen weights, mask lr x{mult:g})", f"maskllm_lr{mult:g}",
           rule(f"{{method: maskllm, freeze_weights: true, mask_lr_mult: {mult}}}"))
          for mult in args.mask_lr_mults),
    ]
    dense_cfg = load_config(tiny, [*finetune, "name=mask_eval_dense"])
    dense_cfg.rules = []
    dense_model = init_model(dense_cfg)
    rows = [{"method": "dense (no pruning)", "val_loss": evaluate_model(
        dense_model, dense_cfg)["loss"], "trained": "-", **NO_MASK_STATS,
        "wall_seconds": 0.0}]
    curves = {}
    for name, slug, rule_override in variants:
        cfg = load_config(tiny, [*finetune, rule_override, f"name=mask_{slug}",
                                 f"run_dir={runs / slug}"])
        # the dense weights with this variant's initial masks
        start = init_model(cfg) if cfg.rules else None
        if name.startswith("one-shot"):  # no training: the pruned dense model as it is
            model = start
            val, seconds = evaluate_model(model, cfg)["loss"], 0.0
            trained = "nothing"
        else:
            res = run(cfg)
            val = res["val_loss"]
            seconds = training_wall_seconds(runs / slug, res["steps"])
            curves[name] = scalars(runs / slug, "val/loss")
            trained = "mask logits only" if "MaskLLM" in name else "all weights"
            model = load_model(runs / slug)[0]
        stats = NO_MASK_STATS
        if cfg.rules:  # the masks it ends with, and those it started from
            stats = {**mask_statistics(model, dense_model), "groups_changed_at_start":
                     mask_statistics(start, dense_model)["groups_changed"]}
        rows.append({"method": name, "val_loss": val, "trained": trained, **stats,
                     "wall_seconds": seconds})
    dense_loss, oneshot = rows[0]["val_loss"], rows[2]["val_loss"]
    for r in rows:
        r["gap_to_dense"] = r["val_loss"] - dense_loss
        r["recovered_of_oneshot_gap"] = ((oneshot - r["val_loss"]) / (oneshot - dense_loss)
                                         if oneshot != dense_loss else None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    out_label = (str(out.resolve().relative_to(REPO)) if out.resolve().is_relative_to(REPO)
                 else str(out))
    cmd = " ".join(["python experiments/maskllm_vs_oneshot.py", f"--steps {args.steps}",
                    f"--lr {args.lr}",
                    "--mask-lr-mults " + " ".join(f"{m:g}" for m in args.mask_lr_mults),
                    *([f"--dense {args.dense}"] if args.dense else
                      [f"--dense-steps {args.dense_steps}"]),
                    *(f"--override {o}" for o in args.override),
                    *([f"--seed {args.seed}"] if args.seed else []),
                    *([f"--paths '{args.paths}'"] if args.paths != BLOCK_LINEARS else []),
                    *([f"--data {args.data}"] if args.data else []),
                    *([f"--out {out_label}"] if out_label != DEFAULT_OUT else [])])
    lines = ["# MaskLLM vs one-shot magnitude 2:4 pruning of a trained dense GPT", "",
             f"Command: `{cmd}`  ",
             f"Data: `{Path(data).name}`; dense model "
             f"`configs/gpt_tiny.yaml` ({'given' if args.dense else f'{args.dense_steps} steps'}); "
             f"2:4 on `{args.paths}`; {args.steps} fine-tuning steps at peak lr {args.lr}; "
             f"seed {args.seed}. Simulated sparsity on 2 CPU cores.", "",
             "| method | trained | val loss | gap to dense | share of one-shot gap recovered "
             "| sparsity | groups off the magnitude mask (at start) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda value, spec: "-" if value is None else format(value, spec)
    for r in rows:
        lines.append(f"| {r['method']} | {r['trained']} | {r['val_loss']:.4f} | "
                     f"{r['gap_to_dense']:+.4f} | {fmt(r['recovered_of_oneshot_gap'], '.2f')} | "
                     f"{fmt(r['sparsity'], '.4f')} | {fmt(r['groups_changed'], '.3f')} "
                     f"({fmt(r['groups_changed_at_start'], '.3f')}) | "
                     f"{r['wall_seconds']:.0f} |")
    lines += ["", "Validation loss in nats (fixed validation batches) of each model's inference "
              "form (MaskLLM: the argmax candidate of every group); curves in `curves.png`. "
              "Sparsity: zeros in the sparse layers' inference weights. Groups off the "
              "magnitude mask: share of 2:4 groups whose kept pair differs from the top-2 "
              "magnitudes of the dense weights, after fine-tuning (and before it: MaskLLM's "
              "prior starts a few groups elsewhere).", ""]
    (out / "results.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        ax.plot(*zip(*curve, strict=True), marker="o", ms=3, label=name)
    ax.axhline(dense_loss, color="k", ls="--", lw=1, label="dense")
    ax.axhline(oneshot, color="r", ls=":", lw=1, label="one-shot magnitude")
    ax.set(xlabel="fine-tuning step", ylabel="validation loss (nats)",
           title="2:4 masks of a trained GPT")
    save_figure(fig, out / "curves.png", fontsize=8)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
