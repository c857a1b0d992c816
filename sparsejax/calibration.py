"""What calibration reads from a model without the model knowing: the inputs of its linear
layers (Gram matrices ``X^T X``, for post-training pruning) and the queries, keys, values
and outputs of its attention modules (for attention methods that start from a trained
model), recorded through the layers' taps, in the order the forward calls them, on
batches of a run's training stream."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.corpus import Tokenizer, encode_text_file
from sparsejax.errors import ConfigError
from sparsejax.nn import Attention, named_layers, tap_attention, tap_linear_inputs
from sparsejax.tasks import build_task

__all__ = ["attention_calls", "attention_outputs", "calibration_batches", "call_order",
           "input_grams", "linear_calls", "text_calibration_batches"]


def calibration_batches(cfg: Any, count: int, seed: int | None = None) -> list[np.ndarray]:
    """The model inputs of the first ``count`` training batches of ``cfg``'s stream (seed
    ``seed``, default the run's own)."""
    cfg = copy.deepcopy(cfg)
    if seed is not None:
        cfg.train.seed = seed
    task = build_task(cfg)
    return [task.train_batch(step)["x"] for step in range(count)]


def text_calibration_batches(path: Path, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                             count: int) -> list[np.ndarray]:
    """``count`` batches ``(batch_size, seq_len)`` of consecutive, non-overlapping token
    sequences from the start of a text file (as Wanda and SparseGPT calibrate on C4);
    raises :class:`ConfigError` when the file is too short."""
    ids, _ = encode_text_file(path, tokenizer, "--calib-data")
    need = count * batch_size * seq_len
    if len(ids) < need:
        raise ConfigError(f"--calib-data {path} has {len(ids):,} tokens; {count} batches of "
                          f"{batch_size} x {seq_len} need {need:,} (lower --calib-batches or "
                          "--calib-seq-len)")
    rows = np.asarray(ids[:need], np.int32).reshape(count, batch_size, seq_len)
    return list(rows)


def linear_calls(model: nnx.Module, x: jax.Array) -> list[tuple[str, jax.Array]]:
    """``(layer path, input)`` of every Linear call of ``model(x)``, in call order."""
    paths = {id(layer): path for path, layer in named_layers(model)}
    calls: list[tuple[str, jax.Array]] = []
    with tap_linear_inputs(lambda layer, v: calls.append((paths[id(layer)], v))):
        model(x)
    return calls


def call_order(model: nnx.Module, example: np.ndarray,
               calls: Callable[[nnx.Module, jax.Array], list[tuple]] | None = None
               ) -> list[str]:
    """The layer paths in the order ``model``'s forward calls them (traced once,
    abstractly): the Linear layers, or those ``calls(model, x)`` reports as
    ``[(path, ...), ...]`` (:func:`attention_calls`: the attention modules)."""
    calls = calls or linear_calls
    graphdef, state = nnx.split(model)
    order: list[str] = []

    def trace(state, x):
        order[:] = [call[0] for call in calls(nnx.merge(graphdef, state), x)]
        return 0

    jax.eval_shape(trace, state, jnp.asarray(example))
    return list(dict.fromkeys(order))


@functools.lru_cache(maxsize=64)
def _gram_function(graphdef: nnx.GraphDef, wanted: frozenset[str]) -> Callable:
    """The jitted ``(state, x) -> {path: x^T x}`` of the layers ``wanted`` (cached per
    model structure, so a sequential pass compiles once per layer, not once per call)."""

    @jax.jit
    def grams(state, x):
        out: dict[str, jax.Array] = {}
        for path, v in linear_calls(nnx.merge(graphdef, state), x):
            if path in wanted:
                v = v.reshape(-1, v.shape[-1]).astype(jnp.float32)
                out[path] = out.get(path, 0.0) + v.T @ v
        return out

    return grams


def input_grams(model: nnx.Module, batches: Sequence[np.ndarray], paths: Sequence[str]
                ) -> dict[str, jax.Array]:
    """``{path: H}`` with ``H = sum over batches and tokens of x^T x`` ``(in, in)``
    (float32) of the input of each layer in ``paths``, ``model`` as it is, in inference
    form (a layer called several times sums over its calls)."""
    model.eval()
    graphdef, state = nnx.split(model)
    grams = _gram_function(graphdef, frozenset(paths))
    total: dict[str, jax.Array] = {}
    for x in batches:
        for path, g in grams(state, jnp.asarray(x)).items():
            total[path] = total[path] + g if path in total else g
    return total


def attention_calls(model: nnx.Module, x: jax.Array) -> list[tuple]:
    """``(path, q, k, v, y, x)`` of every attention call of ``model(x)``, in call order."""
    paths = {id(layer): path for path, layer in named_layers(model, (Attention,))}
    calls: list = []
    with tap_attention(lambda layer, q, k, v, y, x: calls.append((paths[id(layer)], q, k, v,
                                                                    y, x))):
        model(x)
    return calls


@functools.lru_cache(maxsize=64)
def _tap_function(graphdef: nnx.GraphDef, wanted: str | None) -> Callable:
    """The jitted ``(state, ids) -> {path: (q, k, v, y, x)}`` of the attention calls
    (only ``wanted`` when set), cached per model structure."""

    @jax.jit
    def taps(state, ids):
        return {path: (q, k, v, y, x) for path, q, k, v, y, x in
                attention_calls(nnx.merge(graphdef, state), ids)
                if wanted is None or path == wanted}

    return taps


def attention_outputs(model: nnx.Module, batches: Sequence[np.ndarray],
                      path: str | None = None) -> dict[str, tuple[jax.Array, ...]]:
    """``{path: (q, k, v, y, x)}`` over the ``batches`` concatenated - ``q, k, v, y``
    ``(N, T, H, D)`` and the module input ``x`` ``(N, T, C)`` - of every attention module
    (or only ``path``) of ``model`` in inference form."""
    model.eval()
    graphdef, state = nnx.split(model)
    taps = _tap_function(graphdef, path)
    parts: dict[str, list] = {}
    for x in batches:
        for name, arrays in taps(state, jnp.asarray(x)).items():
            parts.setdefault(name, []).append(arrays)
    return {name: tuple(jnp.concatenate(a, axis=0) for a in zip(*chunks, strict=True))
            for name, chunks in parts.items()}
