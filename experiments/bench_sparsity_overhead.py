"""Step time of N:M sparse training over dense training, measured side by side.

Default GPT (configs/gpt_tiny.yaml), FFN linears 2:4 by path rule. Each variant's full
trainer step (forward, backward, AdamW, the per-layer sparsity metrics) is compiled ahead,
then the variants are timed in alternating rounds so that machine noise hits all alike.
Sparsity is *simulated* (dense matmuls with zeros): the cost measured is that of the
transform, MVUE and metrics, not a speed-up.

    python experiments/bench_sparsity_overhead.py              # ~9 min on 2 CPU cores
    python experiments/bench_sparsity_overhead.py --steps 50 --rounds 5

Targets on CPU: S-STE <= 1.10 x dense, S-STE + MVUE <= 1.25 x dense, RigL and SET <= 1.15 x
dense averaged over steps with and without a mask update.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import overhead_args, overhead_report, time_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FFN = "blocks/\\d+/mlp/(fc|proj)"
BLOCKS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"
VARIANTS = {
    "dense": [],
    "ste": [f"rules=[{{path: '{FFN}', sparsity: {{method: ste}}}}]"],
    "sr_ste": [f"rules=[{{path: '{FFN}', sparsity: {{method: sr_ste}}}}]"],
    "sste": [f"rules=[{{path: '{FFN}', sparsity: {{method: sste}}}}]"],
    "sste+mvue": [f"rules=[{{path: '{FFN}', sparsity: {{method: sste, mvue: true}}}}]"],
    "maskllm": [f"rules=[{{path: '{FFN}', sparsity: {{method: maskllm}}}}]"],
    "maskllm frozen": [f"rules=[{{path: '{FFN}', sparsity: {{method: maskllm, "
                       "freeze_weights: true}}]"],
    # unstructured dynamic sparsity, every block linear at 90 % (ERK); the timed steps run
    # from 0, so dt=10 puts a mask update in 2 of every 30 steps, dt=1 in every step
    "rigl (dt=10)": [f"rules=[{{path: '{BLOCKS}', sparsity: {{method: rigl, sparsity: 0.9, "
                     "distribution: erk, dt: 10}}]"],
    "set (dt=10)": [f"rules=[{{path: '{BLOCKS}', sparsity: {{method: set, sparsity: 0.9, "
                    "distribution: erk, dt: 10}}]"],
    "rigl (dt=1)": [f"rules=[{{path: '{BLOCKS}', sparsity: {{method: rigl, sparsity: 0.9, "
                    "distribution: erk, dt: 1}}]"],
}


def main() -> None:
    args = overhead_args(__doc__.splitlines()[0],
                         REPO / "experiments/results/bench_sparsity_overhead")

    times, ratio = time_variants(args.config, VARIANTS, args.steps, args.rounds)
    targets = {"sste": 1.10, "sste+mvue": 1.25, "rigl (dt=10)": 1.15, "set (dt=10)": 1.15}
    overhead_report("N:M sparse training step time over dense (simulated sparsity)",
                    "bench_sparsity_overhead.py", args, " (FFN linears 2:4)", "dense", times,
                    ratio, targets, "Each step includes the per-layer sparsity metrics the "
                    "trainer logs (flip rate, realised sparsity, near-threshold fraction; "
                    "MaskLLM: entropy, soft-hard gap, regulariser). MaskLLM frozen: its "
                    "mask-only mode (weights get no gradient or update). RigL / SET: every "
                    "block linear at 90 % (ERK); the mask hook runs every step (gradient "
                    "masking), the top-k mask update only on update steps (lax.cond); dt=1 "
                    "is the cost of an update step itself.")


if __name__ == "__main__":
    main()
