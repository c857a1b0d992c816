"""Step time of analog noise-injected training over the clean step (bfloat16), side by side.

Default GPT (configs/gpt_tiny.yaml) in bfloat16 compute. Analog variants by path rule on
every transformer-block linear (attention qkv/proj, MLP fc/proj) and the MLP activations:
weight noise (aihwkit's tutorial setting: additive, 0.06 of max|W|), activation noise,
both, and an aihwkit-HWA-like tile (weight noise, Gaussian clip 2.5, 8-bit DAC and ADC,
output noise 0.04 in the normalised MVM). Each variant's full trainer step (forward,
backward, AdamW) is compiled ahead and the variants are timed in alternating rounds. The
noise and converters are simulated in floating point: the figure is the cost of the
simulation.

    python experiments/bench_analog_overhead.py                # ~4 min on 2 CPU cores
    python experiments/bench_analog_overhead.py --steps 50 --rounds 7

Target on CPU: weight + activation noise <= 1.30 x the clean step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import overhead_args, overhead_report, time_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINEARS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"
ACTS = "blocks/\\d+/mlp/act"
BF16 = ["model.dtype=bfloat16"]


def analog_rules(linear_spec: str | None, act_spec: str | None) -> list[str]:
    rules = []
    if linear_spec:
        rules.append(f"{{path: '{LINEARS}', analog: {{{linear_spec}}}}}")
    if act_spec:
        rules.append(f"{{path: '{ACTS}', analog: {{{act_spec}}}}}")
    return [*BF16, f"rules=[{', '.join(rules)}]"]


WEIGHT = "weight_noise: 0.06"
ACT = "act_noise: 0.1"
HWA = ("weight_noise: 0.06, clip_alpha: 2.5, dac_bits: 8, adc_bits: 8, out_noise: 0.04")
VARIANTS = {
    "clean bf16": BF16,
    "weight noise 0.06": analog_rules(WEIGHT, None),
    "activation noise 0.1": analog_rules(None, ACT),
    "weight + activation noise": analog_rules(WEIGHT, ACT),
    "HWA-like tile (+ clip, DAC/ADC 8 bit, out noise)": analog_rules(HWA, ACT),
}
TARGETS = {"weight + activation noise": 1.30}


def main() -> None:
    args = overhead_args(__doc__.splitlines()[0],
                         REPO / "experiments/results/bench_analog_overhead")
    times, ratio = time_variants(args.config, VARIANTS, args.steps, args.rounds)
    overhead_report("Analog noise-injected training step time over the clean step "
                    "(bfloat16, simulated analog)", "bench_analog_overhead.py", args,
                    f" with `model.dtype=bfloat16`; analog rules on every block linear "
                    f"(`{LINEARS}`) and MLP activation (`{ACTS}`)", "clean", times, ratio,
                    TARGETS, "Noise is drawn once per step per layer (one `jax.random.normal` "
                    "of the weight's shape, of the activation's shape), keyed by a "
                    "checkpointed counter.")


if __name__ == "__main__":
    main()
