"""Datasets: byte-level / token language-model corpora and the digits classification set.

Every batch is a pure function of ``(seed, step)``: the launcher can resume at any step
without replaying a data iterator, and two runs with the same seed see the same data.

Sources (``data.source``):

* ``stdlib`` - a byte corpus assembled deterministically from the running Python's
  standard-library ``*.py`` files (sorted by name, top-level directory only). Real text on
  every machine, so the default experiment needs no download.
* ``text`` - any file, read as raw bytes (vocabulary 256).
* ``tokens`` - a directory written by ``sparsejax prepare`` (``train.bin``, ``val.bin``,
  ``meta.json`` giving the dtype and vocabulary, ``tokenizer.json``), read by memmap; or a
  bare ``uint16`` token file / directory of ``train.bin`` and ``val.bin`` (nanoGPT's
  format), whose vocabulary the config must state.
* ``digits`` - scikit-learn's bundled 8x8 digits, 64 features in [0, 1], 10 classes.

The validation split is the tail ``val_fraction`` of the corpus (contiguous, so no
validation window overlaps a training window), or for digits a fixed permutation.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsejax.config import DataConfig, DataSource
from sparsejax.corpus import Tokenizer, read_meta

__all__ = [
    "ClassificationData",
    "TokenData",
    "load_digits_data",
    "load_token_data",
    "stdlib_corpus",
    "unigram_entropy_bits",
]

_DIGITS_SPLIT_SEED = 1234  # fixed so the split does not move with the training seed
_BARE_TOKENS = np.dtype(np.uint16)  # nanoGPT's .bin


def stdlib_corpus(max_bytes: int = 0) -> bytes:
    """The default corpus: top-level ``*.py`` files of the standard library, sorted by name,
    joined by a blank line; cut to ``max_bytes`` when that is > 0."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_bytes() + b"\n\n"
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes and total >= max_bytes:
            break
    corpus = b"".join(chunks)
    if not corpus:
        raise FileNotFoundError(f"no *.py files under the standard library at {root}")
    return corpus[:max_bytes] if max_bytes else corpus


def unigram_entropy_bits(tokens: np.ndarray, vocab_size: int) -> float:
    """Shannon entropy of the token histogram in bits per token: the loss of the best
    model that ignores context, the bar a language model has to clear."""
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@dataclass
class TokenData:
    """Train / validation token streams for next-token prediction."""

    train: np.ndarray  # (N_train,) integer tokens (may be a memmap)
    val: np.ndarray  # (N_val,)
    vocab_size: int
    byte_level: bool  # tokens are raw bytes: bits per token == bits per byte
    # bytes of text per token id (from the corpus's tokenizer), for bits per byte; None for
    # a bare token file
    token_bytes: np.ndarray | None = None

    def train_batch(self, seed: int, step: int, batch_size: int, block_size: int,
                    rows: slice | None = None) -> dict[str, np.ndarray]:
        """Random windows of the training stream: ``x`` (B, T) int32, ``y`` = x shifted by
        one. A pure function of ``(seed, step)``; ``rows`` reads only those rows of the
        batch (a process's shard)."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - block_size - 1, size=batch_size)
        return _windows(self.train, starts[rows or slice(None)], block_size)

    def eval_batches(self, num_batches: int, batch_size: int, block_size: int
                     ) -> list[dict[str, np.ndarray]]:
        """Fixed validation windows spread evenly over the held-out tail; with a
        tokenizer, ``y_bytes`` (B, T) float32 gives the bytes of text of each target."""
        count = num_batches * batch_size
        starts = np.linspace(0, len(self.val) - block_size - 1, count).astype(np.int64)
        batches = [_windows(self.val, starts[i * batch_size:(i + 1) * batch_size], block_size)
                   for i in range(num_batches)]
        if self.token_bytes is not None:
            for batch in batches:
                batch["y_bytes"] = self.token_bytes[batch["y"]].astype(np.float32)
        return batches


def _windows(stream: np.ndarray, starts: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    rows = np.stack([np.asarray(stream[s:s + block_size + 1]) for s in starts]).astype(np.int32)
    return {"x": rows[:, :-1], "y": rows[:, 1:]}


@dataclass
class ClassificationData:
    """Feature / label arrays, split into train and validation."""

    x_train: np.ndarray  # (N, F) float32
    y_train: np.ndarray  # (N,) int32
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    def train_batch(self, seed: int, step: int, batch_size: int, rows: slice | None = None
                    ) -> dict[str, np.ndarray]:
        """Epoch-wise shuffling: step ``s`` reads positions ``[s*B, (s+1)*B)`` of the
        concatenated per-epoch permutations (epoch ``e`` permuted by ``rng([seed, e])``);
        ``rows``: only those rows of the batch."""
        n = len(self.x_train)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        idx = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(positions // n):
            sel = positions // n == epoch
            perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
            idx[sel] = perm[positions[sel] % n]
        idx = idx[rows or slice(None)]
        return {"x": self.x_train[idx], "y": self.y_train[idx]}

    def eval_batches(self, num_batches: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        """The whole validation split in batches (``num_batches`` is ignored: the split is
        small enough to always evaluate in full)."""
        del num_batches
        n = len(self.x_val)
        return [{"x": self.x_val[i:i + batch_size], "y": self.y_val[i:i + batch_size]}
                for i in range(0, n, batch_size)]


def _split_stream(tokens: np.ndarray, val_fraction: float, min_len: int, what: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(math.ceil(len(tokens) * val_fraction))
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if len(train) <= min_len or len(val) <= min_len:
        raise ValueError(f"{what}: {len(tokens)} tokens are too few for block_size windows "
                         f"of {min_len} (train {len(train)}, val {len(val)})")
    return train, val


def load_token_data(cfg: DataConfig, block_size: int, vocab_size: int) -> TokenData:
    """Load a language-model corpus as described by ``cfg``."""
    min_len = block_size + 1
    if cfg.source in (DataSource.stdlib, DataSource.text):
        if cfg.source == DataSource.stdlib:
            raw, what = stdlib_corpus(cfg.max_bytes), "stdlib corpus"
        else:
            raw, what = Path(cfg.path).read_bytes(), str(cfg.path)
            if cfg.max_bytes:
                raw = raw[:cfg.max_bytes]
        tokens = np.frombuffer(raw, dtype=np.uint8)
        train, val = _split_stream(tokens, cfg.val_fraction, min_len, what)
        return TokenData(train=train, val=val, vocab_size=256, byte_level=True,
                         token_bytes=np.ones(256, np.int32))
    if cfg.source == DataSource.tokens:
        path = Path(cfg.path)
        meta = read_meta(path) if path.is_dir() else None
        dtype, token_bytes = _BARE_TOKENS, None
        if meta is not None:
            if meta["vocab_size"] > vocab_size:
                raise ValueError(f"{path / 'meta.json'}: vocabulary {meta['vocab_size']} is "
                                 f"larger than model.vocab_size={vocab_size}")
            dtype = np.dtype(meta["dtype"])
            tokenizer = Tokenizer.for_corpus(path, meta)
            token_bytes = np.zeros(vocab_size, np.int32)  # padded rows stand for nothing
            token_bytes[:tokenizer.vocab_size] = tokenizer.token_bytes()
        if path.is_dir():
            train, val = (_memmap_tokens(path / "train.bin", dtype),
                          _memmap_tokens(path / "val.bin", dtype))
            for name, arr in (("train.bin", train), ("val.bin", val)):
                if len(arr) <= min_len:
                    raise ValueError(f"{path / name}: {len(arr)} tokens, need > {min_len}")
        else:
            train, val = _split_stream(_memmap_tokens(path), cfg.val_fraction, min_len, str(path))
        for name, arr in (("train", train), ("val", val)):
            top = int(max(np.max(arr[i:i + (1 << 24)]) for i in range(0, len(arr), 1 << 24)))
            if top >= vocab_size:
                raise ValueError(f"{path}: {name} split holds token id {top} but "
                                 f"model.vocab_size={vocab_size}")
        byte_level = meta is not None and meta["tokenizer"] == "bytes"
        return TokenData(train=train, val=val, vocab_size=vocab_size, byte_level=byte_level,
                         token_bytes=token_bytes)
    raise ValueError(f"data.source={cfg.source.value} is not a token source")


def _memmap_tokens(path: Path, dtype: np.dtype = _BARE_TOKENS) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    if path.stat().st_size % dtype.itemsize:
        raise ValueError(f"{path}: size {path.stat().st_size} bytes is not a multiple of "
                         f"{dtype.itemsize}; expected {dtype.name} tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def load_digits_data(cfg: DataConfig) -> ClassificationData:
    """scikit-learn's 8x8 digits (1797 samples), scaled to [0, 1], split by a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x))
    n_val = int(math.ceil(len(x) * cfg.val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return ClassificationData(x_train=x[train_idx], y_train=y[train_idx],
                              x_val=x[val_idx], y_val=y[val_idx], num_classes=10)
