"""Does a refactor change what sparsejax computes, or how fast? This checkout against an
earlier git revision, side by side.

1. *Bitwise*: short runs (12 steps, 2 layers, context 64, batch 8) of every method and
   combination the configs and README use - S-STE / STE / SR-STE / dense / MVUE / FP8 /
   the packed kernel, MaskLLM frozen and joint, DAT / absmax-STE / LSQ / FP8 quantisation,
   S-STE + DAT, analog tiles, S-STE + analog + activation noise, GMP / SET / RigL,
   gain-cell from scratch and calibrated from a softmax teacher, CSKV from a teacher, L-Mul
   and FP8 attention - under both revisions; final train and validation loss and a hash of
   the trained weights must be equal bit for bit. ``--golden FILE`` also writes the base
   revision's results, the golden file of ``tests/test_same_numbers.py``.
2. *Step time*: each variant's compiled trainer step timed under both revisions in
   alternating rounds (two worker processes, so machine noise hits both alike).

    python experiments/revision_equivalence.py --base f8473a1     # ~25 min on 2 CPU cores

The base revision is checked out into a temporary git worktree and imported from there
(``PYTHONPATH``); ``sparsejax.kernels`` comes from this checkout's install, so kernel
changes are not compared. Writes ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"
FFN = "blocks/\\d+/mlp/(fc|proj)"
CASES = {  # name -> (config, overrides); each is valid under both revisions
    "sste": ("gpt_sste", []),
    "ste": ("gpt_sste", ["rules.0.sparsity.method=ste"]),
    "sr_ste": ("gpt_sste", ["rules.0.sparsity.method=sr_ste"]),
    "dense rule": ("gpt_sste", ["rules.0.sparsity.method=dense"]),
    "sste + mvue": ("gpt_sste", ["rules.0.sparsity.mvue=true"]),
    "sste + fp8": ("gpt_sste", ["rules.0.sparsity.fp8=true"]),
    "ste pallas (4 steps)": ("gpt_sste", ["rules.0.sparsity.method=ste",
                                          "rules.0.sparsity.kernel=pallas", "train.steps=4"]),
    "maskllm frozen": ("gpt_maskllm", []),
    "maskllm joint x10": ("gpt_maskllm", ["rules.0.sparsity.freeze_weights=false",
                                          "rules.0.sparsity.mask_lr_mult=10"]),
    "A1W1 DAT": ("gpt_a1w1_dat", []),
    "A4W4 absmax-STE": ("gpt_a1w1_dat", [
        "rules.0.quant.weights.method=absmax_ste", "rules.0.quant.activations.method=absmax_ste",
        "rules.0.quant.weights.bits=4", "rules.0.quant.activations.bits=4"]),
    "A4W4 LSQ": ("gpt_a1w1_dat", [
        "rules.0.quant.weights.method=lsq", "rules.0.quant.activations.method=lsq",
        "rules.0.quant.weights.bits=4", "rules.0.quant.activations.bits=4"]),
    "FP8 quantisation": ("gpt_a1w1_dat", [f"rules=[{{path: '{BLOCKS}', quant: {{weights: "
                                          "{method: fp8}, activations: {method: fp8}}}]"]),
    "sste + DAT W4A4": ("gpt_sste", [f"rules=[{{path: '{FFN}', sparsity: {{method: sste}}, "
                                     "quant: {weights: {method: dat, bits: 4, affine: false}, "
                                     "activations: {method: dat, bits: 4}}}]"]),
    "MLP analog": ("mlp_analog", []),
    "MLP analog tile": ("mlp_analog", ["rules.0.analog.dac_bits=8", "rules.0.analog.adc_bits=8",
                                       "rules.0.analog.out_noise=0.04",
                                       "rules.0.analog.read_noise=0.0175"]),
    "dense gpt_tiny": ("gpt_tiny", []),
    "gmp": ("gpt_tiny", [f"rules=[{{path: '{FFN}', sparsity: {{method: gmp, sparsity: 0.5, "
                         "dt: 5}}]"]),
    "set": ("gpt_tiny", [f"rules=[{{path: '{FFN}', sparsity: {{method: set, sparsity: 0.5, "
                         "dt: 5}}]"]),
    "rigl": ("gpt_tiny", [f"rules=[{{path: '{FFN}', sparsity: {{method: rigl, sparsity: 0.5, "
                          "dt: 5}}]"]),
    "gain-cell from scratch": ("gpt_gaincell", ["rules.0.attention.calib_batches=0"]),
    "gain-cell calibrated from a teacher": ("gpt_gaincell", ["train.init_from=@teacher",
                                                             "rules.0.attention.calib_batches=2"]),
    "cskv from a teacher": ("gpt_cskv", ["train.init_from=@teacher",
                                         "rules.0.attention.calib_batches=2"]),
    "lmul attention": ("gpt_tiny", ["rules=[{path: 'blocks/\\d+/attn', attention: "
                                    "{method: lmul}}]"]),
    "fp8 attention": ("gpt_tiny", ["rules=[{path: 'blocks/\\d+/attn', attention: "
                                   "{method: fp8}}]"]),
    "GPT sste + analog": ("gpt_sste", [
        f"rules=[{{path: '{FFN}', sparsity: {{method: sste}}, analog: {{weight_noise: 0.06, "
        "clip_alpha: 2.5, out_noise: 0.04}}, {path: 'blocks/\\d+/mlp/act', analog: "
        "{act_noise: 0.1}}]"]),
}
TIMED = {  # name -> overrides of configs/gpt_tiny.yaml
    "dense": [],
    "sste": [f"rules=[{{path: '{FFN}', sparsity: {{method: sste}}}}]"],
    "sste+mvue": [f"rules=[{{path: '{FFN}', sparsity: {{method: sste, mvue: true}}}}]"],
    "maskllm": [f"rules=[{{path: '{FFN}', sparsity: {{method: maskllm}}}}]"],
    "A4W4 DAT": [f"rules=[{{path: '{BLOCKS}', quant: {{weights: {{method: dat, bits: 4}}, "
                 "activations: {method: dat, bits: 4}}}]"],
    "A4W4 LSQ": [f"rules=[{{path: '{BLOCKS}', quant: {{weights: {{method: lsq, bits: 4}}, "
                 "activations: {method: lsq, bits: 4}}}]"],
    "analog w+a noise (bf16)": ["model.dtype=bfloat16", f"rules=[{{path: '{BLOCKS}', analog: "
                                "{weight_noise: 0.06}}, {path: 'blocks/\\d+/mlp/act', analog: "
                                "{act_noise: 0.1}}]"],
}

RUN_CASE = r"""
import hashlib, json, sys, tempfile
import jax, numpy as np
from flax import nnx
from sparsejax.config import load_config
try:
    from sparsejax.runs import load_model
except ImportError:  # a revision from before the run store
    from sparsejax.train import load_model
from sparsejax.train import run
config, overrides = sys.argv[1], json.loads(sys.argv[2])
d = tempfile.mkdtemp()
base = ["train.steps=12", "train.eval_every=6", "train.eval_batches=1",
        "logging.tensorboard=false", "logging.progress=none", "checkpoint.every=6",
        "data.batch_size=8"] + ([] if "mlp" in config else [
            "data.max_bytes=200000", "model.n_layer=2", "model.block_size=64"])
if "train.init_from=@teacher" in overrides:  # a 6-step softmax run of the same config first
    run(load_config(f"configs/{config}.yaml", base + ["rules=[]", "train.steps=6",
                                                      f"run_dir={d}/teacher"]), verbose=False)
    overrides = [o.replace("@teacher", f"{d}/teacher") for o in overrides]
r = run(load_config(f"configs/{config}.yaml", base + overrides + [f"run_dir={d}/run"]),
        verbose=False)
model, _, _ = load_model(f"{d}/run")
h = hashlib.sha256()
leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
for path, leaf in sorted(leaves, key=lambda t: jax.tree_util.keystr(t[0])):
    name = jax.tree_util.keystr(path)
    if any(k in name for k in ("kernel", "bias", "embedding", "scale")):
        h.update(np.asarray(leaf).tobytes())
print(json.dumps({"train_loss": r["train_loss"], "val_loss": r["val_loss"],
                  "weights": h.hexdigest()[:16]}))
"""

TIME_WORKER = r"""
import json, sys
sys.path.insert(0, "experiments")
from common import compiled_step, time_steps
variants = json.loads(sys.argv[1])
entries = {k: compiled_step("configs/gpt_tiny.yaml", v) for k, v in variants.items()}
for e in entries.values():
    time_steps(e, 2)
print("ready", flush=True)
for line in sys.stdin:
    name, steps = line.rstrip("\n").rsplit(" ", 1)
    print(f"{time_steps(entries[name], int(steps)):.6f}", flush=True)
"""


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


def run_case(root: Path, config: str, overrides: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN_CASE, config, json.dumps(overrides)],
                         cwd=root, env=_env(root), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_side_by_side(roots: dict[str, Path], rounds: int, steps: int) -> dict:
    workers = {}
    for label, root in roots.items():
        proc = subprocess.Popen([sys.executable, "-c", TIME_WORKER, json.dumps(TIMED)],
                                cwd=root, env=_env(root), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the timing worker of {label} did not start")
        workers[label] = proc
    times = {(label, name): [] for label in roots for name in TIMED}
    for r in range(rounds):
        for name in TIMED:
            for label in (list(roots) if r % 2 == 0 else list(roots)[::-1]):
                workers[label].stdin.write(f"{name} {steps}\n")
                workers[label].stdin.flush()
                times[(label, name)].append(float(workers[label].stdout.readline()))
        print(f"timing round {r} done", flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    return times


def _timing_table(roots: dict[str, Path], rounds: int, steps: int) -> list[str]:
    times = time_side_by_side(roots, rounds, steps)
    lines = ["", "## Step time of the compiled trainer step (configs/gpt_tiny.yaml)", "",
             "| variant | base ms | this ms | this / base (median of per-round ratios) |",
             "|---|---|---|---|"]
    for name in TIMED:
        a, b = times[("base", name)], times[("this", name)]
        ratio = statistics.median(y / x for x, y in zip(a, b, strict=True))
        lines.append(f"| {name} | {1000 * statistics.median(a):.1f} | "
                     f"{1000 * statistics.median(b):.1f} | {ratio:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--out", default=str(REPO / "experiments/results/revision_equivalence"))
    parser.add_argument("--no-timing", action="store_true", help="the bitwise part only")
    parser.add_argument("--golden", default=None, metavar="JSON",
                        help="also write the base revision's results per case (the golden "
                        "file of tests/test_same_numbers.py)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp()) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO,
                   check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
    try:
        roots = {"base": base, "this": REPO}
        lines = [f"# This checkout ({head}, uncommitted changes included) against {args.base}",
                 "", f"Command: `python experiments/revision_equivalence.py --base {args.base} "
                 f"--rounds {args.rounds} --steps {args.steps}"
                 f"{' --no-timing' if args.no_timing else ''}`", "",
                 "## Bitwise: 12-step runs (2 layers, context 64, batch 8)", "",
                 "| case | train loss | val loss | weights hash | equal |", "|---|---|---|---|---|"]
        golden = {}
        for name, (config, overrides) in CASES.items():
            a, b = (run_case(root, config, overrides) for root in roots.values())
            golden[name] = {"config": config, "overrides": overrides, **a}
            lines.append(f"| {name} | {b['train_loss']!r} | {b['val_loss']!r} | "
                         f"{b['weights']} | {'yes' if a == b else f'NO (base {a})'} |")
            print(lines[-1], flush=True)
        if args.golden:
            Path(args.golden).write_text(json.dumps({"base": args.base, "cases": golden},
                                                    indent=1) + "\n")
        if not args.no_timing:
            lines += _timing_table(roots, args.rounds, args.steps)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO,
                       capture_output=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
