"""Decoder-only GPT (GPT-2 layout): pre-LayerNorm blocks, causal self-attention, GELU MLP,
learned positions, optional tying of the output head to the token embedding.

Parameters carry logical axes for ``sparsejax.sharding`` (``embed``, ``heads``, ``mlp``,
``vocab``). Module paths of the linear layers, for rules: ``blocks/<i>/attn/qkv``,
``blocks/<i>/attn/proj``, ``blocks/<i>/mlp/fc``, ``blocks/<i>/mlp/proj`` and, untied,
``lm_head``; the MLP's activation (for analog activation noise): ``blocks/<i>/mlp/act``;
the attention modules (for ``attention`` rules, e.g. gain-cell attention):
``blocks/<i>/attn``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.family import LANGUAGE_MODEL_FIELDS, Family, ModelField, register_family
from sparsejax.nn import Activation, Attention, Embed, LayerNorm, Linear, dropout, shard_batch

__all__ = ["GPT", "KVCache"]

# one layer's cache: {"k", "v"} of (B, block_size, n_head, head_dim), or an attention
# transform's own layout
KVCache = dict[str, jax.Array]


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class CausalSelfAttention(Attention):
    def __init__(self, n_embd: int, n_head: int, *, resid_init: nnx.initializers.Initializer,
                 dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(n_head, n_embd // n_head)
        self.dropout_rate = dropout_rate
        init = nnx.initializers.normal(0.02)
        self.qkv = Linear(n_embd, 3 * n_embd, kernel_init=init, axes=("embed", "heads"),
                          dtype=dtype, rngs=rngs)
        self.proj = Linear(n_embd, n_embd, kernel_init=resid_init, axes=("heads", "embed"),
                           dtype=dtype, rngs=rngs)

    def _heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values of ``x`` (B, T, C), each (B, T, n_head, C / n_head)."""
        b, t, c = x.shape
        shape = (b, t, self.n_head, c // self.n_head)
        return tuple(part.reshape(shape) for part in jnp.split(self.qkv(x), 3, axis=-1))

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """``x``: (B, T, C) -> (B, T, C)."""
        y = self.attend(*self._heads(x), x=x)
        return dropout(self.proj(y.reshape(x.shape)), self.dropout_rate, key)

    def cached(self, x: jax.Array, cache: KVCache, pos: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """``x``: (B, T, C), the tokens at positions ``pos .. pos + T - 1``; their keys and
        values are written into ``cache`` (``k``, ``v``: (B, L, H, D)) and each query
        attends to the cached positions up to its own. Returns (B, T, C) and the cache."""
        y, cache = self.attend_cached(*self._heads(x), x, cache, pos)
        return self.proj(y.reshape(x.shape)), cache

    def kv_projection(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(W_k, b_k, W_v, b_v)`` from the qkv layer's inference weight and bias."""
        w = self.qkv.effective_kernel()
        b = self.qkv.bias[...] if self.qkv.bias is not None else jnp.zeros(w.shape[1])
        _, w_k, w_v = jnp.split(w, 3, axis=1)
        _, b_k, b_v = jnp.split(b, 3)
        return w_k, b_k, w_v, b_v


class MLP(nnx.Module):
    def __init__(self, n_embd: int, hidden: int, *, resid_init: nnx.initializers.Initializer,
                 dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        init = nnx.initializers.normal(0.02)
        self.fc = Linear(n_embd, hidden, kernel_init=init, axes=("embed", "mlp"), dtype=dtype,
                         rngs=rngs)
        self.act = Activation("gelu")
        self.proj = Linear(hidden, n_embd, kernel_init=resid_init, axes=("mlp", "embed"),
                           dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return dropout(self.proj(self.act(self.fc(x))), self.dropout_rate, key)


class Block(nnx.Module):
    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int, *,
                 resid_init: nnx.initializers.Initializer, dropout_rate: float,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(n_embd, dtype=dtype)
        self.attn = CausalSelfAttention(n_embd, n_head, resid_init=resid_init,
                                        dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(n_embd, dtype=dtype)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, resid_init=resid_init,
                       dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln_1(x), _fold(key, 0))
        return x + self.mlp(self.ln_2(x), _fold(key, 1))

    def cached(self, x: jax.Array, cache: KVCache, pos: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        y, cache = self.attn.cached(self.ln_1(x), cache, pos)
        x = x + y
        return x + self.mlp(self.ln_2(x), None), cache


class GPT(nnx.Module):
    """Token ids ``(B, T)`` -> next-token logits ``(B, T, vocab_size)`` (float32).

    Initialisation follows GPT-2: N(0, 0.02) everywhere, residual output projections
    N(0, 0.02 / sqrt(2 * n_layer)).
    """

    def __init__(self, *, vocab_size: int = 256, block_size: int = 128, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, mlp_ratio: int = 4,
                 dropout_rate: float = 0.0, tie_embeddings: bool = True,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.block_size = block_size
        self.dropout_rate = dropout_rate
        resid_init = nnx.initializers.normal(0.02 / math.sqrt(2 * n_layer))
        self.wte = Embed(vocab_size, n_embd, axes=("vocab", "embed"), dtype=dtype, rngs=rngs)
        self.wpe = Embed(block_size, n_embd, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([
            Block(n_embd, n_head, mlp_ratio, resid_init=resid_init, dropout_rate=dropout_rate,
                  dtype=dtype, rngs=rngs) for _ in range(n_layer)])
        self.ln_f = LayerNorm(n_embd, dtype=dtype)
        self.lm_head = None if tie_embeddings else Linear(
            n_embd, vocab_size, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
            axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    def __call__(self, ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        t = ids.shape[-1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        x = self.wte(ids) + self.wpe(jnp.arange(t))
        x = shard_batch(dropout(x, self.dropout_rate, _fold(dropout_key, 0)))
        for i, block in enumerate(self.blocks):
            x = shard_batch(block(x, _fold(dropout_key, i + 1)))
        return self._logits(x)

    def _logits(self, x: jax.Array) -> jax.Array:
        """The final LayerNorm and the (tied or own) output head, in float32."""
        x = self.ln_f(x)
        logits = self.wte.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, dtype: jnp.dtype = jnp.float32) -> list[KVCache]:
        """An empty KV cache of ``block_size`` positions per layer: ``[{"k", "v"}]`` of
        shape (B, block_size, n_head, head_dim), or the layout of a layer's attention
        transform when it keeps its own (e.g. CSKV's compressed cache)."""
        return [block.attn.init_cache(batch, self.block_size, dtype) for block in self.blocks]

    def forward_cached(self, ids: jax.Array, cache: list[KVCache], pos: jax.Array
                       ) -> tuple[jax.Array, list[KVCache]]:
        """Logits (B, T, vocab) of ``ids`` (B, T) at positions ``pos .. pos + T - 1``,
        attending to the ``cache`` of the earlier positions (no dropout), and the updated
        cache. The same numbers as ``self(...)`` on the whole sequence; ``pos + T`` must
        not exceed ``block_size``. Prefill: ``pos = 0``; decoding: one token at a time."""
        t = ids.shape[-1]
        x = self.wte(ids) + self.wpe(pos + jnp.arange(t))
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.cached(x, layer_cache, pos)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache

    def generate(self, prompt: jax.Array, key: jax.Array, max_new_tokens: int,
                 temperature: float = 1.0) -> jax.Array:
        """Sample ``max_new_tokens`` continuations of ``prompt`` (B, T0) -> (B, T0 + new).

        Plain loop over a cropped context that recomputes it every token (no KV cache): a
        reference for :mod:`sparsejax.sample`, which decodes through a cache.
        """
        ids = prompt
        for i in range(max_new_tokens):
            logits = self(ids[:, -self.block_size:])[:, -1] / max(temperature, 1e-6)
            nxt = jax.random.categorical(jax.random.fold_in(key, i), logits)
            ids = jnp.concatenate([ids, nxt[:, None].astype(ids.dtype)], axis=1)
        return ids


def _build(m, dtype, rngs: nnx.Rngs) -> GPT:
    return GPT(vocab_size=m.vocab_size, block_size=m.block_size, n_layer=m.n_layer,
               n_head=m.n_head, n_embd=m.n_embd, mlp_ratio=m.mlp_ratio,
               dropout_rate=m.dropout, tie_embeddings=m.tie_embeddings, dtype=dtype,
               rngs=rngs)


def _check(m) -> list[tuple[str, str]]:
    if m.n_head > 0 and m.n_embd % m.n_head:
        return [("model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")]
    return []


register_family(Family(
    name="gpt", task="language", build=_build, check=_check,
    fields=(*LANGUAGE_MODEL_FIELDS, ModelField("mlp_ratio", int, 4)),
    doc="GPT-2 layout: learned positions, LayerNorm, GELU MLP"))
