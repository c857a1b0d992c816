"""Text from a trained run, decoded through a KV cache: ``sparsejax sample``.

:class:`Decoder` holds two compiled functions over a fixed-size cache of ``block_size``
positions per layer (:meth:`sparsejax.models.GPT.forward_cached`): a prefill of the prompt
(compiled once per prompt length) and a one-token step (compiled once). Both sample the
next token inside the compiled function (temperature, top-k; temperature 0 is greedy).
The model is in its inference form (``model.eval()``: MaskLLM's argmax masks, quantised
weights, analog tiles as at evaluation); with ``pack``, 2:4 layers run packed.

When the context fills the block, the cache is rebuilt from the last half block of tokens
(a prefill), so the model always sees at least ``block_size / 2`` tokens of context; the
uncached reference (:meth:`~sparsejax.models.GPT.generate`) instead crops to the last
``block_size`` tokens at every step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.config import Config, DataSource
from sparsejax.corpus import Tokenizer, read_meta
from sparsejax.errors import ConfigError
from sparsejax.hf import is_hf_dir
from sparsejax.nn import pack_model
from sparsejax.runs import load_model, resolve_checkpoint

__all__ = ["Decoder", "SampleResult", "run_tokenizer", "sample", "sample_token",
           "source_tokenizer"]


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_k: int
                 ) -> jax.Array:
    """Next token ids (B,) from logits (B, V): greedy at ``temperature`` 0, else a draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest (0: all)."""
    if temperature <= 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


class Decoder:
    """Cached autoregressive decoding of a GPT (batch of one prompt)."""

    def __init__(self, model: nnx.Module, temperature: float = 0.8, top_k: int = 40,
                 cache_dtype: jnp.dtype = jnp.float32):
        model.eval()
        self.block_size = model.block_size
        self.graphdef, self.state = nnx.split(model)
        self.cache_dtype = cache_dtype
        graphdef = self.graphdef

        def prefill(state, ids, key):
            m = nnx.merge(graphdef, state, copy=True)
            cache = m.init_cache(ids.shape[0], cache_dtype)
            logits, cache = m.forward_cached(ids, cache, jnp.int32(0))
            return sample_token(logits[:, -1], key, temperature, top_k), cache

        def step(state, token, cache, pos, key):
            m = nnx.merge(graphdef, state, copy=True)
            logits, cache = m.forward_cached(token[:, None], cache, pos)
            return sample_token(logits[:, 0], key, temperature, top_k), cache

        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step, donate_argnums=2)

    def generate(self, prompt: np.ndarray, max_new_tokens: int, key: jax.Array
                 ) -> np.ndarray:
        """``max_new_tokens`` ids continuing ``prompt`` (1-D, at most ``block_size``)."""
        context = [int(i) for i in prompt]
        if not 0 < len(context) <= self.block_size:
            raise ValueError(f"prompt of {len(context)} tokens: need 1..{self.block_size}")
        token, cache = self._prefill(self.state, jnp.asarray([context], jnp.int32),
                                     jax.random.fold_in(key, 0))
        pos, out = len(context), []

        def on_host() -> list[int]:
            return [int(t[0]) for t in jax.device_get(out)]

        for i in range(1, max_new_tokens + 1):
            out.append(token)
            if i == max_new_tokens:
                break
            step_key = jax.random.fold_in(key, i)
            if pos == self.block_size:  # full: rebuild the cache from the last half block
                window = (context + on_host())[-(self.block_size // 2):]
                token, cache = self._prefill(self.state, jnp.asarray([window], jnp.int32),
                                             step_key)
                pos = len(window)
                continue
            token, cache = self._step(self.state, token, cache, jnp.int32(pos), step_key)
            pos += 1
        return np.asarray(on_host(), np.int64)


@dataclass
class SampleResult:
    prompt: str
    text: str  # the continuation
    prompt_tokens: int
    new_tokens: int
    seconds: float  # decoding, compilation excluded (a warm-up call compiles)
    truncated: bool  # the prompt was cut to the block size

    @property
    def tokens_per_sec(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def run_tokenizer(cfg: Config):
    """The tokenizer a run was trained with: raw bytes (``stdlib``, ``text``, a bytes
    corpus) or the prepared corpus's ``tokenizer.json``. Raises :class:`ConfigError` for
    a bare token file (its tokenizer is unknown)."""
    if cfg.data.source in (DataSource.stdlib, DataSource.text):
        return Tokenizer()
    path = Path(cfg.data.path)
    meta = read_meta(path) if path.is_dir() else None
    if meta is None:
        raise ConfigError(f"data.path {path} has no meta.json: the run's tokenizer is "
                          "unknown (prepare corpora with `sparsejax prepare`)")
    return Tokenizer.for_corpus(path, meta)


def source_tokenizer(run_dir: Path, cfg: Config) -> Tokenizer:
    """An HF directory's ``tokenizer.json``, else the run's (:func:`run_tokenizer`)."""
    if is_hf_dir(run_dir):
        if not (run_dir / "tokenizer.json").is_file():
            raise ConfigError(f"{run_dir} has no tokenizer.json: its tokens are unknown")
        return Tokenizer.from_file(run_dir / "tokenizer.json")
    return run_tokenizer(cfg)


def sample(run_dir: str | Path, prompt: str = "", max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0,
           step: int | None = None, pack: bool = False,
           message: Callable[[str], None] | None = None) -> SampleResult:
    """Continue ``prompt`` with the model of ``run_dir`` (latest checkpoint, or ``step``).

    An empty prompt starts from ``<|endoftext|>`` (BPE) or a newline (bytes). A prompt
    longer than the block is cut from the left, and ``message`` is told so once."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    message = message or (lambda text: print(text, file=sys.stderr))
    run_dir, step = resolve_checkpoint(run_dir, step)
    model, cfg, _ = load_model(run_dir, step)
    tokenizer = source_tokenizer(run_dir, cfg)
    ids = tokenizer.encode(prompt) if prompt else np.asarray(
        [tokenizer.eot_id if tokenizer.eot_id is not None else ord("\n")], np.int64)
    truncated = len(ids) > model.block_size
    if truncated:
        message(f"prompt of {len(ids)} tokens cut to the last {model.block_size} "
                "(the block size)")
        ids = ids[-model.block_size:]
    if pack:
        pack_model(model)
    decoder = Decoder(model, temperature, top_k)
    key = jax.random.key(seed)
    decoder.generate(ids, min(max_new_tokens, 2), key)  # compile prefill and step
    start = time.perf_counter()
    new = decoder.generate(ids, max_new_tokens, key)
    seconds = time.perf_counter() - start
    return SampleResult(tokenizer.decode(ids), tokenizer.decode(new), len(ids), len(new),
                        seconds, truncated)
