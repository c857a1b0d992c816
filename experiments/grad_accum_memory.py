"""Gradient accumulation: the compiled step's memory and time for k = 1, 2, 4, 8
micro-batches, measured side by side in one run, and the update checked equal.

    python experiments/grad_accum_memory.py                     # gpt_tiny, batch 32
    python experiments/grad_accum_memory.py --batch 64 --rounds 5 --ks 1,4,16

For each k the trainer's own step (``train.grad_accum=k``) is compiled ahead; XLA's
memory analysis gives the temporary bytes (activations and gradients live in the step)
and the argument bytes (parameters, optimiser state, batch). Steps are timed in
interleaved rounds (the median per k), and the first step's loss and updated
parameters are compared with k = 1. Writes ``experiments/results/grad_accum_memory/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compiled_step, time_steps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "grad_accum_memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt_tiny.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    entries, rows = {}, []
    for k in ks:
        entry = compiled_step(args.config, [f"data.batch_size={args.batch}",
                                            f"train.grad_accum={k}"])
        memory = entry[0].memory_analysis()
        params, rest, opt_state, rng = entry[1]
        new_params, _, _, metrics = entry[0](params, rest, opt_state, rng, entry[2][0],
                                             np.int32(0))
        entries[k] = entry
        rows.append({"k": k, "temp_mib": memory.temp_size_in_bytes / 2**20,
                     "argument_mib": memory.argument_size_in_bytes / 2**20,
                     "loss": float(metrics["loss"]),
                     "params": jax.device_get(new_params)})
    times = {k: [] for k in ks}
    for _ in range(args.rounds):
        for k in ks:
            times[k].append(time_steps(entries[k], args.steps))
    base = rows[0]
    lines = [f"# Gradient accumulation: memory and time per step (k = {args.ks})", "",
             f"Config `{Path(args.config).name}`, batch {args.batch}, JAX {jax.__version__} "
             f"on {jax.devices()[0].platform}; median of {args.rounds} interleaved rounds "
             f"of {args.steps} steps.", "",
             "| k | micro-batch | temp MiB | temp vs k=1 | args MiB | ms/step | time vs k=1 "
             "| loss - loss(k=1) | max param diff |", "|---|---|---|---|---|---|---|---|---|"]
    t0 = statistics.median(times[ks[0]])
    for row in rows:
        k = row["k"]
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
            jax.tree.leaves(row["params"]), jax.tree.leaves(base["params"]), strict=True))
        t = statistics.median(times[k])
        lines.append(f"| {k} | {args.batch // k} | {row['temp_mib']:.1f} | "
                     f"{row['temp_mib'] / base['temp_mib']:.2f} | {row['argument_mib']:.1f} | "
                     f"{t * 1e3:.1f} | {t / t0:.2f} | {row['loss'] - base['loss']:+.1e} | "
                     f"{diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
