"""``sparsejax evaluate``: the standard fixed-length perplexity protocol (Hugging Face's
"Perplexity of fixed-length models" guide; the Wanda / SparseGPT WikiText-2 tables).

The file is encoded as one sequence with the model's tokenizer (bytes for byte-level
runs, a prepared corpus's or an HF directory's ``tokenizer.json``). Windows of ``N``
tokens (default: the model's context) start every ``S`` tokens (default ``N``); each window
scores only the targets no earlier window scored (target ``t`` is predicted from tokens
``begin .. t - 1`` of its window), so no target is scored twice; a window's first token is
context only, so with ``S = N`` each window's first token goes unscored, as in the
guide's loop. ``perplexity = exp(total NLL /
scored targets)``; ``bits_per_byte = total NLL / ln 2 / the file's bytes``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.corpus import encode_text_file
from sparsejax.errors import ConfigError
from sparsejax.runs import load_model, resolve_checkpoint
from sparsejax.sample import source_tokenizer

__all__ = ["evaluate_ids", "evaluate_text_file", "strided_windows"]


def strided_windows(n_tokens: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """``[(begin, end, first), ...]``: window ``ids[begin:end]`` scores the targets at
    window positions ``first .. end - begin - 1`` (those no earlier window scored)."""
    if not 1 <= stride <= block:
        raise ConfigError(f"--stride {stride} must be in [1, --block-size {block}]")
    windows, scored_to = [], 1  # targets before scored_to are done; token 0 is no target
    for begin in range(0, n_tokens, stride):  # the guide's loop
        end = min(begin + block, n_tokens)
        if end - begin >= 2 and end > scored_to:  # a 1-token window has no target
            windows.append((begin, end, max(scored_to - begin, 1)))
        scored_to = max(scored_to, end)
        if end == n_tokens:
            break
    return windows


def _window_nll(model: nnx.Module) -> Callable:
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, ids, weights):
        """Summed NLL of ``ids[:, 1:]`` given the prefix, weighted per target."""
        logits = nnx.merge(graphdef, state)(ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * weights)

    return lambda ids, weights: nll(state, ids, weights)


def evaluate_ids(model: nnx.Module, ids: np.ndarray, block: int, stride: int,
                 batch_size: int = 1, progress: bool = False) -> dict[str, float]:
    """``{"nll", "scored", "tokens"}`` of the token sequence ``ids`` under the protocol
    (``model`` in inference form)."""
    from tqdm import tqdm

    model.eval()
    nll = _window_nll(model)
    windows = strided_windows(len(ids), block, stride)
    total, scored = 0.0, 0
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for window in windows:
        by_length.setdefault(window[1] - window[0], []).append(window)
    with tqdm(total=len(windows), desc="evaluating", disable=not progress) as bar:
        for length, group in by_length.items():
            for i in range(0, len(group), batch_size):
                part = group[i:i + batch_size]
                batch = np.stack([ids[b:e] for b, e, _ in part]).astype(np.int32)
                weights = np.zeros((len(part), length - 1), np.float32)
                for row, (_, _, first) in enumerate(part):
                    weights[row, first - 1:] = 1.0
                total += float(nll(jnp.asarray(batch), jnp.asarray(weights)))
                scored += int(weights.sum())
                bar.update(len(part))
    return {"nll": total, "scored": scored, "tokens": int(len(ids))}


def evaluate_text_file(source: str | Path, data: str | Path, *, block_size: int | None = None,
                       stride: int | None = None, batch_size: int = 1,
                       step: int | None = None, json_out: str | Path | None = None,
                       progress: bool | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte of ``source`` (a run, checkpoint or HF directory) on
    the text file ``data``; written to ``json_out`` when given. Raises
    :class:`ConfigError` (one line) for bad settings or an unreadable file."""
    run_dir, step = resolve_checkpoint(source, step)
    model, cfg, step = load_model(run_dir, step)
    block = cfg.model.block_size if block_size is None else block_size
    if not 2 <= block <= cfg.model.block_size:
        raise ConfigError(f"--block-size {block} must be in [2, the model's context "
                          f"{cfg.model.block_size}]")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    stride = block if stride is None else stride
    strided_windows(2, block, stride)  # refuses a bad stride before any work
    ids, n_bytes = encode_text_file(Path(data), source_tokenizer(run_dir, cfg), "--data")
    if len(ids) < 2:
        raise ConfigError(f"--data {data} encodes to {len(ids)} token(s): nothing to score")
    sums = evaluate_ids(model, ids, block, stride, batch_size,
                        sys.stderr.isatty() if progress is None else progress)
    result = {"perplexity": math.exp(sums["nll"] / sums["scored"]),
              "bits_per_byte": sums["nll"] / math.log(2) / n_bytes,
              "tokens": sums["tokens"], "scored": sums["scored"], "bytes": n_bytes,
              "block_size": block, "stride": stride, "source": str(run_dir), "step": step,
              "data": str(data)}
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result
