"""Decoding speed: KV-cached (``sparsejax sample``) against recomputing the context every
token, side by side in one run.

    python experiments/bench_sampling.py                       # configs/gpt_tiny.yaml
    python experiments/bench_sampling.py --config configs/gpt_sste.yaml --new 512

Both decode greedily from the same model (random initialisation: speed does not depend on
the weights) and the same 16-token prompt. The uncached decoder is the fair version of
``GPT.generate``: one compiled forward over a fixed ``block_size`` window (the context
right-padded), the logits read at the last real position - so it compiles once, like the
cached one. Reports tokens per second (median of interleaved rounds), their ratio, and
whether the greedy tokens agree. Writes ``experiments/results/bench_sampling/``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.config import load_config
from sparsejax.runs import init_model
from sparsejax.sample import Decoder

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "bench_sampling"


def uncached_decoder(model):
    """Greedy decoding that runs the whole (padded) window every token."""
    graphdef, state = nnx.split(model)
    block = model.block_size

    @jax.jit
    def next_token(state, window, last):
        logits = nnx.merge(graphdef, state, copy=True)(window)
        return jnp.argmax(logits[0, last]).astype(jnp.int32)

    def generate(prompt: np.ndarray, new: int) -> np.ndarray:
        ids = [int(i) for i in prompt]
        for _ in range(new):
            context = ids[-block:]
            window = np.zeros((1, block), np.int32)
            window[0, :len(context)] = context
            ids.append(int(next_token(state, window, len(context) - 1)))
        return np.asarray(ids[len(prompt):])

    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt_tiny.yaml"))
    parser.add_argument("--new", type=int, default=256, help="tokens per decode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    model = init_model(cfg)
    model.eval()
    prompt = np.arange(1, 17) % cfg.model.vocab_size
    cached = Decoder(model, temperature=0.0)
    uncached = uncached_decoder(model)
    key = jax.random.key(0)
    runs = {"cached": lambda: cached.generate(prompt, args.new, key),
            "uncached": lambda: uncached(prompt, args.new)}
    outputs = {name: fn() for name, fn in runs.items()}  # compile and warm up
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.new / statistics.median(t) for name, t in times.items()}
    within = cfg.model.block_size - len(prompt)  # tokens before the first cache rebuild
    agree = int(np.sum(outputs["cached"][:within] == outputs["uncached"][:within]))
    text = "\n".join([
        "# Decoding speed: KV cache vs recomputing the context", "",
        f"Config `{Path(args.config).name}` (block {cfg.model.block_size}, "
        f"{cfg.model.n_layer} layers, width {cfg.model.n_embd}), JAX {jax.__version__} on "
        f"{jax.devices()[0].platform}; greedy, {args.new} new tokens from a 16-token prompt, "
        f"median of {args.rounds} interleaved rounds.", "",
        "| decoder | tokens/s |", "|---|---|",
        f"| KV cache (`sparsejax sample`) | {rate['cached']:.1f} |",
        f"| whole window every token | {rate['uncached']:.1f} |", "",
        f"Cached / uncached: **{rate['cached'] / rate['uncached']:.2f}x**. Greedy tokens "
        f"agree on {agree} of the first {within} (before the cache is first rebuilt; "
        "after it, the cached decoder sees half a block of context, the uncached one a "
        "full block).", ""])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
