"""What a model family provides (``docs/architecture.md``): the protocol a language model
file implements so that every method, the trainer, decoding and the checkpoint tools run on
it unchanged. A family is built only from ``sparsejax.nn`` parts - ``Linear``,
``Activation``, ``Attention`` subclasses, ``Embed``, norms - whose parameters carry logical
axes for ``sparsejax.sharding``; attention methods act only through ``nn.Attention``, so
no family names a method."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

__all__ = ["LanguageModel"]


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder-only language model family.

    ``block_size``: the longest context. ``__call__``: token ids ``(B, T)`` -> next-token
    logits ``(B, T, vocab)`` in float32 (``dropout_key`` None: no dropout).
    ``init_cache(batch)``: one decoding cache per attention module (each module's
    ``init_cache``: ``{"k", "v"}`` of its key / value heads, or its attention method's own
    layout). ``forward_cached(ids, cache, pos)``: the logits of ``ids`` at positions
    ``pos .. pos + T - 1`` attending to the cache, and the updated cache - the same numbers
    as ``__call__`` on the whole sequence. Its attention modules expose ``kv_projection()``
    for methods that re-project keys and values (CSKV)."""

    block_size: int

    def __call__(self, ids: jax.Array, *, dropout_key: jax.Array | None = None
                 ) -> jax.Array: ...

    def init_cache(self, batch: int, dtype: Any = ...) -> list[dict[str, jax.Array]]: ...

    def forward_cached(self, ids: jax.Array, cache: list[dict[str, jax.Array]],
                       pos: jax.Array) -> tuple[jax.Array, list[dict[str, jax.Array]]]: ...
