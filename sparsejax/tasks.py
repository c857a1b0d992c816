"""Tasks tie a data source to a model family and a loss.

``LanguageModelTask``: GPT on a token stream, next-token cross-entropy, bits per byte
(byte-level data) or bits per token. ``ClassificationTask``: MLP on digits,
cross-entropy and accuracy. The trainer sees only this interface.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsejax.config import Config
from sparsejax.data import load_digits_data, load_token_data, unigram_entropy_bits
from sparsejax.models import family

__all__ = ["ClassificationTask", "LanguageModelTask", "Task", "build_model", "build_task"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    """The model ``cfg.model`` describes, without loading any data (rules not applied):
    its family's builder (``sparsejax.models.family``)."""
    m = cfg.model
    return family(m.kind).build(m, _DTYPES[m.dtype], rngs)


def _cross_entropy(model, batch, dropout_key) -> tuple[jax.Array, jax.Array]:
    """``(logits, mean cross-entropy)`` of ``model(batch['x'])`` against ``batch['y']``."""
    logits = model(batch["x"], dropout_key=dropout_key)
    return logits, optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


class Task:
    item_name: str  # what throughput counts: "tokens" or "samples"
    items_per_batch: int
    eval_metric_names: tuple[str, ...]  # the validation metrics, in display order

    cfg: Config

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.cfg, rngs)

    def train_batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The training batch of ``step`` (a pure function of seed and step); ``rows``:
        only those rows (a process's shard of the global batch)."""
        ...

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """The fixed validation batches (built once in the constructor)."""
        return self._eval

    @staticmethod
    def loss(model: nnx.Module, batch: dict[str, jax.Array], dropout_key: jax.Array | None
             ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    @staticmethod
    def eval_sums(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-batch sums (``count`` included) that :meth:`finish_eval` turns into means."""
        ...

    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]: ...

    def summary(self) -> dict[str, Any]:
        """Facts about the data to print and log (corpus sizes, baselines)."""
        return {}


class LanguageModelTask(Task):
    item_name = "tokens"

    def __init__(self, cfg: Config):
        m, d = cfg.model, cfg.data
        self.cfg = cfg
        self.data = load_token_data(d, m.block_size, m.vocab_size)
        self.items_per_batch = d.batch_size * m.block_size
        # bits per byte wherever the tokens' bytes are known (raw bytes, a prepared
        # corpus): one scale for byte-level and subword runs; bits per token otherwise
        self.bits_name = "bpb" if self.data.byte_level else "bits_per_token"
        names = ["loss"]
        if self.data.token_bytes is not None:
            names.append("bpb")
        if not self.data.byte_level:
            names.append("bits_per_token")
        self.eval_metric_names = tuple(names)
        self._eval = self.data.eval_batches(cfg.train.eval_batches, d.batch_size, m.block_size)

    def train_batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        return self.data.train_batch(self.cfg.train.seed, step, self.cfg.data.batch_size,
                                     self.cfg.model.block_size, rows)

    @staticmethod
    def loss(model, batch, dropout_key):
        return _cross_entropy(model, batch, dropout_key)[1], {}

    @staticmethod
    def eval_sums(model, batch):
        logits = model(batch["x"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        sums = {"loss": nll.sum(), "count": jnp.asarray(nll.size, jnp.float32)}
        if "y_bytes" in batch:
            sums["bytes"] = batch["y_bytes"].sum()
        return sums

    def finish_eval(self, sums):
        return lm_eval_metrics(sums, self.eval_metric_names)

    def summary(self):
        vocab = self.data.vocab_size
        # The unigram entropy of a long token file is O(N); sample a bounded prefix.
        sample = self.data.train[: 1 << 26]
        return {"train_tokens": len(self.data.train), "val_tokens": len(self.data.val),
                f"unigram_entropy_{self.bits_name}": unigram_entropy_bits(sample, vocab)}


def lm_eval_metrics(sums: dict[str, float], names: tuple[str, ...]) -> dict[str, float]:
    """Validation metrics from summed negative log-likelihoods (nats): ``loss`` (nats per
    token), ``bits_per_token`` = loss / ln 2 and ``bpb`` = total nats / ln 2 / total bytes
    of text the targets stand for."""
    out = {"loss": sums["loss"] / sums["count"]}
    if "bpb" in names:
        out["bpb"] = sums["loss"] / math.log(2) / sums["bytes"]
    if "bits_per_token" in names:
        out["bits_per_token"] = out["loss"] / math.log(2)
    return out


class ClassificationTask(Task):
    item_name = "samples"
    eval_metric_names = ("loss", "accuracy")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data = load_digits_data(cfg.data)
        self.items_per_batch = cfg.data.batch_size
        self._eval = self.data.eval_batches(cfg.train.eval_batches, cfg.data.batch_size)

    def train_batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        return self.data.train_batch(self.cfg.train.seed, step, self.cfg.data.batch_size,
                                     rows)

    @staticmethod
    def loss(model, batch, dropout_key):
        logits, loss = _cross_entropy(model, batch, dropout_key)
        accuracy = (logits.argmax(-1) == batch["y"]).mean()
        return loss, {"accuracy": accuracy}

    @staticmethod
    def eval_sums(model, batch):
        logits = model(batch["x"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        correct = (logits.argmax(-1) == batch["y"]).sum()
        return {"loss": nll.sum(), "correct": correct.astype(jnp.float32),
                "count": jnp.asarray(nll.size, jnp.float32)}

    def finish_eval(self, sums):
        return {"loss": sums["loss"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}

    def summary(self):
        counts = np.bincount(self.data.y_train, minlength=self.data.num_classes)
        return {"train_samples": len(self.data.x_train), "val_samples": len(self.data.x_val),
                "majority_class_accuracy": float(counts.max() / counts.sum())}


def build_task(cfg: Config) -> Task:
    if family(cfg.model.kind).task == "language":
        return LanguageModelTask(cfg)
    return ClassificationTask(cfg)
