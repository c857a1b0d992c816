"""The Llama family (Llama 2/3, Mistral, Qwen2 layouts): pre-norm decoder blocks with
RMSNorm, rotary position embeddings (optionally with Llama 3.1's "llama3" frequency
scaling), grouped-query attention and a SwiGLU MLP; no biases except optional q/k/v biases
(Qwen2); tied or untied output head.

The layout and numerics follow Hugging Face's ``LlamaForCausalLM`` (``rotate_half``
rotary layout, RMSNorm statistics in float32), so its checkpoints map onto these
parameters one to one. Deviation: parameters are initialised N(0, 0.02) like
``transformers``, but the two residual output projections (``o``, ``down``) take GPT-2's
N(0, 0.02 / sqrt(2 n_layer)), which trains better from scratch at our depth.

Module paths, for rules: ``layers/<i>/attn/{q,k,v,o}``, ``layers/<i>/mlp/{gate,up,down}``
and, untied, ``lm_head`` (linear layers); ``layers/<i>/mlp/act`` (the SiLU of the gate,
for analog activation noise); ``layers/<i>/attn`` (attention modules, for ``attention``
rules). Logical axes as GPT's: ``embed``, ``heads``, ``mlp``, ``vocab``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.family import LANGUAGE_MODEL_FIELDS, Family, ModelField, register_family
from sparsejax.nn import Activation, Attention, Embed, Linear, RMSNorm, dropout, shard_batch
from sparsejax.nn.rotary import Rotary, apply_rotary

__all__ = ["Llama", "LlamaAttention", "default_mlp_hidden"]

KVCache = dict[str, jax.Array]


def default_mlp_hidden(n_embd: int) -> int:
    """SwiGLU's hidden size at the parameters of a 4x GELU MLP: ``8 n_embd / 3`` rounded up
    to a multiple of 32 (three matrices instead of two)."""
    return 32 * math.ceil(8 * n_embd / 3 / 32)


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class LlamaAttention(Attention):
    """Grouped-query self-attention with rotary embeddings: ``q`` ``(C, H D)``, ``k``, ``v``
    ``(C, K D)``, ``o`` ``(H D, C)``."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, *, rotary: Rotary,
                 qkv_bias: bool, resid_init: nnx.initializers.Initializer,
                 dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        super().__init__(n_head, n_embd // n_head, n_kv_head)
        self.rotary, self.dropout_rate = rotary, dropout_rate
        init = nnx.initializers.normal(0.02)
        kv_width = n_kv_head * self.head_dim
        self.q = Linear(n_embd, n_embd, use_bias=qkv_bias, kernel_init=init,
                        axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = Linear(n_embd, kv_width, use_bias=qkv_bias, kernel_init=init,
                        axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v = Linear(n_embd, kv_width, use_bias=qkv_bias, kernel_init=init,
                        axes=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.o = Linear(n_embd, n_embd, use_bias=False, kernel_init=resid_init,
                        axes=("heads", "embed"), dtype=dtype, rngs=rngs)

    def _heads(self, x: jax.Array, positions: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries ``(B, T, H, D)`` and keys ``(B, T, K, D)``, and values."""
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.n_head, self.head_dim)
        k = self.k(x).reshape(b, t, self.n_kv_head, self.head_dim)
        v = self.v(x).reshape(b, t, self.n_kv_head, self.head_dim)
        return (apply_rotary(q, positions, self.rotary), apply_rotary(k, positions, self.rotary),
                v)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """``x``: (B, T, C) -> (B, T, C)."""
        y = self.attend(*self._heads(x, jnp.arange(x.shape[1])), x=x)
        return dropout(self.o(y.reshape(x.shape)), self.dropout_rate, key)

    def cached(self, x: jax.Array, cache: KVCache, pos: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """The tokens ``x`` (B, T, C) at ``pos .. pos + T - 1`` through the cache."""
        y, cache = self.attend_cached(*self._heads(x, pos + jnp.arange(x.shape[1])), x,
                                      cache, pos)
        return self.o(y.reshape(x.shape)), cache

    def kv_projection(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(W_k, b_k, W_v, b_v)`` of every query head (the shared heads repeated), as the
        attention transform sees them. Deviation: a re-projecting method (CSKV) thus gets
        the values before the rotation of the keys; it sees rotated keys at ``attend``."""
        def per_query_head(w: jax.Array) -> jax.Array:
            shaped = w.reshape(*w.shape[:-1], self.n_kv_head, 1, self.head_dim)
            groups = self.n_head // self.n_kv_head
            return jnp.broadcast_to(shaped, (*w.shape[:-1], self.n_kv_head, groups,
                                             self.head_dim)).reshape(*w.shape[:-1], -1)

        def bias(layer: Linear) -> jax.Array:
            return (layer.bias[...] if layer.bias is not None
                    else jnp.zeros(layer.out_features))

        return (per_query_head(self.k.effective_kernel()), per_query_head(bias(self.k)),
                per_query_head(self.v.effective_kernel()), per_query_head(bias(self.v)))


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, n_embd: int, hidden: int, *, resid_init: nnx.initializers.Initializer,
                 dropout_rate: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        init = nnx.initializers.normal(0.02)
        self.gate = Linear(n_embd, hidden, use_bias=False, kernel_init=init,
                           axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up = Linear(n_embd, hidden, use_bias=False, kernel_init=init,
                         axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.act = Activation("silu")
        self.down = Linear(hidden, n_embd, use_bias=False, kernel_init=resid_init,
                           axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return dropout(self.down(self.act(self.gate(x)) * self.up(x)), self.dropout_rate, key)


class LlamaBlock(nnx.Module):
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, hidden: int, *,
                 rotary: Rotary, qkv_bias: bool, norm_eps: float,
                 resid_init: nnx.initializers.Initializer, dropout_rate: float,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(n_embd, eps=norm_eps, dtype=dtype)
        self.attn = LlamaAttention(n_embd, n_head, n_kv_head, rotary=rotary, qkv_bias=qkv_bias,
                                   resid_init=resid_init, dropout_rate=dropout_rate,
                                   dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(n_embd, eps=norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(n_embd, hidden, resid_init=resid_init, dropout_rate=dropout_rate,
                            dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), _fold(key, 0))
        return x + self.mlp(self.mlp_norm(x), _fold(key, 1))

    def cached(self, x: jax.Array, cache: KVCache, pos: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        y, cache = self.attn.cached(self.attn_norm(x), cache, pos)
        x = x + y
        return x + self.mlp(self.mlp_norm(x), None), cache


class Llama(nnx.Module):
    """Token ids ``(B, T)`` -> next-token logits ``(B, T, vocab_size)`` (float32); the
    :class:`~sparsejax.models.base.LanguageModel` protocol."""

    def __init__(self, *, vocab_size: int = 256, block_size: int = 128, n_layer: int = 4,
                 n_head: int = 4, n_kv_head: int | None = None, n_embd: int = 128,
                 mlp_hidden: int | None = None, rotary: Rotary | None = None,
                 norm_eps: float = 1e-5, qkv_bias: bool = False, tie_embeddings: bool = True,
                 dropout_rate: float = 0.0, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.block_size, self.dropout_rate = block_size, dropout_rate
        rotary = rotary or Rotary(n_embd // n_head)
        resid_init = nnx.initializers.normal(0.02 / math.sqrt(2 * n_layer))
        self.embed = Embed(vocab_size, n_embd, axes=("vocab", "embed"), dtype=dtype, rngs=rngs)
        self.layers = nnx.List([
            LlamaBlock(n_embd, n_head, n_kv_head or n_head,
                       mlp_hidden or default_mlp_hidden(n_embd), rotary=rotary,
                       qkv_bias=qkv_bias, norm_eps=norm_eps, resid_init=resid_init,
                       dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)
            for _ in range(n_layer)])
        self.norm = RMSNorm(n_embd, eps=norm_eps, dtype=dtype)
        self.lm_head = None if tie_embeddings else Linear(
            n_embd, vocab_size, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
            axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    def __call__(self, ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        if ids.shape[-1] > self.block_size:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds block_size "
                             f"{self.block_size}")
        x = shard_batch(dropout(self.embed(ids), self.dropout_rate, _fold(dropout_key, 0)))
        for i, layer in enumerate(self.layers):
            x = shard_batch(layer(x, _fold(dropout_key, i + 1)))
        return self._logits(x)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

    def init_cache(self, batch: int, dtype: jnp.dtype = jnp.float32) -> list[KVCache]:
        """An empty cache of ``block_size`` positions per layer: ``{"k", "v"}`` of the
        key / value heads ``(B, block_size, n_kv_head, head_dim)``, or a layer's attention
        transform's own layout."""
        return [layer.attn.init_cache(batch, self.block_size, dtype) for layer in self.layers]

    def forward_cached(self, ids: jax.Array, cache: list[KVCache], pos: jax.Array
                       ) -> tuple[jax.Array, list[KVCache]]:
        """Logits of ``ids`` (B, T) at ``pos .. pos + T - 1`` through the cache, and the
        cache; the same numbers as ``self(...)`` on the whole sequence."""
        x = self.embed(ids)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer.cached(x, layer_cache, pos)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache


def _build(m, dtype, rngs: nnx.Rngs) -> Llama:
    rotary = Rotary(m.n_embd // m.n_head, theta=m.rope_theta, scaling=m.rope_scaling,
                    factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                    high_freq_factor=m.rope_high_freq_factor,
                    original_context=m.rope_original_context)
    return Llama(vocab_size=m.vocab_size, block_size=m.block_size, n_layer=m.n_layer,
                 n_head=m.n_head, n_kv_head=m.n_kv_head, n_embd=m.n_embd,
                 mlp_hidden=m.mlp_hidden, rotary=rotary, norm_eps=m.norm_eps,
                 qkv_bias=m.qkv_bias, tie_embeddings=m.tie_embeddings,
                 dropout_rate=m.dropout, dtype=dtype, rngs=rngs)


def _check(m) -> list[tuple[str, str]]:
    bad = []
    if m.n_head > 0 and m.n_embd % m.n_head:
        bad.append(("model.n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}"))
    elif m.n_head > 0 and (m.n_embd // m.n_head) % 2:
        bad.append(("model.n_embd", f"the head dimension {m.n_embd // m.n_head} must be even "
                    "(rotary embeddings rotate pairs)"))
    kv = m.n_kv_head if m.n_kv_head is not None else m.n_head
    if kv < 1 or m.n_head % kv:
        bad.append(("model.n_kv_head", f"{m.n_kv_head} must divide model.n_head={m.n_head}"))
    if m.mlp_hidden is not None and m.mlp_hidden < 1:
        bad.append(("model.mlp_hidden", f"must be >= 1 or null, got {m.mlp_hidden}"))
    if m.rope_scaling not in ("none", "llama3"):
        bad.append(("model.rope_scaling", f"'{m.rope_scaling}' is not one of none|llama3"))
    for key in ("rope_theta", "norm_eps", "rope_factor"):
        if getattr(m, key) <= 0:
            bad.append((f"model.{key}", f"must be > 0, got {getattr(m, key)}"))
    return bad


register_family(Family(
    name="llama", task="language", build=_build, check=_check,
    fields=(*LANGUAGE_MODEL_FIELDS,
            ModelField("n_kv_head", int | None, None,
                       "llama: key / value heads (null: n_head; 1: multi-query)"),
            ModelField("mlp_hidden", int | None, None,
                       "llama: SwiGLU width (null: 8 n_embd / 3 rounded up to 32)"),
            ModelField("rope_theta", float, 10000.0, "llama: rotary base"),
            ModelField("rope_scaling", str, "none", "llama: none | llama3"),
            ModelField("rope_factor", float, 8.0), ModelField("rope_low_freq_factor", float, 1.0),
            ModelField("rope_high_freq_factor", float, 4.0),
            ModelField("rope_original_context", int, 8192),
            ModelField("norm_eps", float, 1e-5, "llama: RMSNorm epsilon"),
            ModelField("qkv_bias", bool, False, "llama: biases on q, k, v (Qwen2)")),
    doc="Llama layout: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU"))
