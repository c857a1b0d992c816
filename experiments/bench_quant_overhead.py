"""Step time of quantised (simulated low-precision) training over full precision, side by side.

Default GPT (configs/gpt_tiny.yaml); every transformer-block linear (attention qkv/proj,
MLP fc/proj) gets its weights and input activations quantised by path rule, sub-channel
blocks of 128. Each variant's full trainer step (forward, backward, AdamW, the per-layer
quantisation diagnostics the trainer logs) is compiled ahead and the variants are timed in
alternating rounds. Quantisation is *simulated* (values rounded onto the grid, float32
arithmetic): the figure is the cost of the transform, not a speed-up.

    python experiments/bench_quant_overhead.py                # ~4 min on 2 CPU cores
    python experiments/bench_quant_overhead.py --steps 50 --rounds 7

Target on CPU: A4W4-DAT <= 1.30 x full precision.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import overhead_args, overhead_report, time_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINEARS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"


def quant_rule(method: str, bits: float, extra: str = "") -> list[str]:
    spec = f"{{method: {method}, bits: {bits}{extra}}}"
    return [f"rules=[{{path: '{LINEARS}', quant: {{weights: {spec}, activations: {spec}}}}}]"]


VARIANTS = {
    "full precision": [],
    "A4W4 absmax-STE": quant_rule("absmax_ste", 4),
    "A4W4 DAT": quant_rule("dat", 4),
    "A1W1 DAT": quant_rule("dat", 1),
    "A4W4 LSQ": quant_rule("lsq", 4),
}
TARGETS = {"A4W4 DAT": 1.30}


def main() -> None:
    args = overhead_args(__doc__.splitlines()[0],
                         REPO / "experiments/results/bench_quant_overhead")

    times, ratio = time_variants(args.config, VARIANTS, args.steps, args.rounds)
    overhead_report("Quantised training step time over full precision (simulated "
                    "quantisation)", "bench_quant_overhead.py", args,
                    ", weights and input activations of every block linear quantised, blocks "
                    "of 128", "full precision", times, ratio, TARGETS,
                    "Each step includes the per-layer quantisation diagnostics the trainer "
                    "logs (MSE before/after denoising, s_g, clipped fraction).")


if __name__ == "__main__":
    main()
