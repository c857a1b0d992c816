"""FP8-simulated attention: softmax attention whose product operands (``q``, ``k``, the
probabilities ``p`` and ``v``) are round-tripped through E4M3 or E5M2 and multiplied
exactly with float32 accumulation, as FP8 tensor cores do; straight-through gradients.
The baseline of L-Mul attention.

Scales are per token (the amax of each query's, key's or value's vector, and of each
query's row of probabilities), not per tensor: a per-tensor amax would let later tokens
change how earlier ones round (a leak through causality), and cached decoding would
differ from the full forward."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.quant import FP8_FORMATS, fp8_ste
from sparsejax.transforms.attention.common import softmax_attention
from sparsejax.transforms.base import (
    AttentionMethod,
    Context,
    Metrics,
    Site,
    SpecError,
    State,
    Transform,
    register,
)

__all__ = ["FP8Attention"]


@register("attention", "fp8")
@dataclass(frozen=True, kw_only=True)
class FP8Attention(AttentionMethod, Transform):
    """``fmt``: ``e4m3`` or ``e5m2``."""

    fmt: str = "e4m3"

    roles = ("attention",)

    def check(self) -> None:
        if self.fmt not in FP8_FORMATS:
            raise SpecError("fmt", f"fmt '{self.fmt}' is not one of {'|'.join(FP8_FORMATS)}")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
               params: State, state: State, site: Site, ctx: Context,
               x: jax.Array | None = None) -> tuple[jax.Array, State, Metrics]:
        def product(a: jax.Array, b: jax.Array) -> jax.Array:
            # a: q or p, one scale per query row; b: k^T or v, already rounded per token
            return jnp.matmul(fp8_ste(a, self.fmt, axis=-1), b)

        k, v = (fp8_ste(t, self.fmt, axis=-1) for t in (k, v))  # (B, L, H, D): per token
        return softmax_attention(q, k, v, q_positions, product), state, {}
