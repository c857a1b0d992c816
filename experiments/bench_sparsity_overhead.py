"""Step time of N:M sparse training over dense training, measured side by side.

Default GPT (configs/gpt_tiny.yaml), FFN linears 2:4 by path rule. Each variant's full
trainer step (forward, backward, AdamW, the per-layer sparsity metrics) is compiled ahead,
then the variants are timed in alternating rounds so that machine noise hits all alike.
Sparsity is *simulated* (dense matmuls with zeros): the cost measured is that of the
transform, MVUE and metrics, not a speed-up.

    python experiments/bench_sparsity_overhead.py              # ~4 min on 2 CPU cores
    python experiments/bench_sparsity_overhead.py --steps 50 --rounds 5

Targets on CPU: S-STE <= 1.10 x dense, S-STE + MVUE <= 1.25 x dense.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sparsejax.config import load_config
from sparsejax.tasks import build_task
from sparsejax.train import init_model, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parents[1]
FFN = "blocks/\\d+/mlp/(fc|proj)"
VARIANTS = {
    "dense": [],
    "ste": [f"rules=[{{path: '{FFN}', sparsity: {{method: ste}}}}]"],
    "sr_ste": [f"rules=[{{path: '{FFN}', sparsity: {{method: sr_ste}}}}]"],
    "sste": [f"rules=[{{path: '{FFN}', sparsity: {{method: sste}}}}]"],
    "sste+mvue": [f"rules=[{{path: '{FFN}', sparsity: {{method: sste, mvue: true}}}}]"],
}


def compiled_step(config: str, overrides: list[str]):
    cfg = load_config(config, overrides)
    task = build_task(cfg)
    graphdef, params, rest = nnx.split(init_model(cfg), nnx.Param, ...)
    tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = [params, rest, tx.init(params), jax.random.key_data(jax.random.key(0))]
    step = jax.jit(make_train_step(graphdef, task, tx, use_dropout=False))
    batches = [task.train_batch(i) for i in range(8)]
    compiled = step.lower(*state, batches[0], np.int32(0)).compile()
    return compiled, state, batches


def time_steps(entry, steps: int) -> float:
    compiled, state, batches = entry
    params, rest, opt_state, rng = state
    start = time.perf_counter()
    for i in range(steps):
        params, rest, opt_state, metrics = compiled(params, rest, opt_state, rng,
                                                    batches[i % len(batches)], np.int32(i))
    jax.block_until_ready((params, metrics))
    entry[1][:] = [params, rest, opt_state, rng]
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "gpt_tiny.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_sparsity_overhead"))
    args = parser.parse_args()

    entries = {name: compiled_step(args.config, ov) for name, ov in VARIANTS.items()}
    for entry in entries.values():
        time_steps(entry, 2)  # warm caches
    times: dict[str, list[float]] = {name: [] for name in entries}
    for r in range(args.rounds):
        for name, entry in entries.items():
            times[name].append(time_steps(entry, args.steps))
        ratios = "  ".join(f"{n} {times[n][-1] / times['dense'][-1]:.3f}" for n in entries)
        print(f"round {r}: {ratios}", flush=True)

    ratio = {n: statistics.median(t / d for t, d in zip(times[n], times["dense"], strict=True))
             for n in entries}
    targets = {"sste": 1.10, "sste+mvue": 1.25}
    lines = ["# N:M sparse training step time over dense (simulated sparsity)", "",
             f"Command: `python experiments/bench_sparsity_overhead.py --steps {args.steps} "
             f"--rounds {args.rounds}`  ",
             f"Config `{Path(args.config).name}` (FFN linears 2:4), {jax.device_count()} x "
             f"{jax.devices()[0].platform}, jax {jax.__version__}; median over rounds of the "
             "per-round ratio.", "",
             "| variant | step time (ms, median) | ratio to dense | target |", "|---|---|---|---|"]
    for n in entries:
        target = f"<= {targets[n]:.2f}" if n in targets else ""
        lines.append(f"| {n} | {1000 * statistics.median(times[n]):.1f} | {ratio[n]:.3f} | "
                     f"{target} |")
    lines += ["", "Each step includes the per-layer sparsity metrics the trainer logs (flip "
              "rate, realised sparsity, near-threshold fraction).", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
