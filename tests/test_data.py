"""Data order is a pure function of (seed, step); splits are deterministic and disjoint."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sparsejax.config import DataConfig, DataSource
from sparsejax.data import (
    load_digits_data,
    load_token_data,
    stdlib_corpus,
    unigram_entropy_bits,
)


def test_stdlib_corpus_is_deterministic_real_text():
    a, b = stdlib_corpus(100_000), stdlib_corpus(100_000)
    assert a == b and len(a) == 100_000
    assert b"def " in a and b"import " in a


@pytest.mark.parametrize("seed, step", [(0, 0), (0, 7), (3, 7)])
def test_train_batch_is_pure_function_of_seed_and_step(seed, step):
    data = load_token_data(DataConfig(max_bytes=50_000), block_size=16, vocab_size=256)
    a = data.train_batch(seed, step, 4, 16)
    b = data.train_batch(seed, step, 4, 16)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["x"][:, 1:], a["y"][:, :-1])  # y is x shifted by one
    other = data.train_batch(seed, step + 1, 4, 16)
    assert not np.array_equal(a["x"], other["x"])
    assert a["x"].shape == (4, 16) and a["x"].dtype == np.int32


def test_split_is_the_tail_and_disjoint():
    cfg = DataConfig(max_bytes=10_000, val_fraction=0.1)
    data = load_token_data(cfg, block_size=8, vocab_size=256)
    corpus = np.frombuffer(stdlib_corpus(10_000), np.uint8)
    assert len(data.val) == 1000 and len(data.train) == 9000
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), corpus)
    batches = data.eval_batches(2, 4, 8)
    assert len(batches) == 2 and batches[0]["x"].shape == (4, 8)


def test_text_and_tokens_sources(tmp_path: Path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"hello world " * 200)
    data = load_token_data(DataConfig(source=DataSource.text, path=str(text)), 8, 256)
    assert data.byte_level and len(data.train) + len(data.val) == 2400

    tokens = np.arange(5000, dtype=np.uint16) % 1000
    tokens.tofile(tmp_path / "toks.bin")
    cfg = DataConfig(source=DataSource.tokens, path=str(tmp_path / "toks.bin"))
    data = load_token_data(cfg, 8, vocab_size=1000)
    assert not data.byte_level and isinstance(data.train, np.memmap)
    np.testing.assert_array_equal(np.asarray(data.train[:5]), [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="token id 999 but model.vocab_size=500"):
        load_token_data(cfg, 8, vocab_size=500)


def test_tokens_directory_with_train_and_val_bin(tmp_path: Path):
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    data = load_token_data(DataConfig(source=DataSource.tokens, path=str(tmp_path)), 8, 512)
    assert len(data.train) == 300 and len(data.val) == 100


def test_odd_sized_token_file_is_rejected(tmp_path: Path):
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 301)
    cfg = DataConfig(source=DataSource.tokens, path=str(tmp_path / "bad.bin"))
    with pytest.raises(ValueError, match="bad.bin: size 301 bytes is not a multiple of 2"):
        load_token_data(cfg, 8, 512)


def test_too_short_corpus_is_rejected(tmp_path: Path):
    (tmp_path / "short.txt").write_bytes(b"abc" * 10)
    cfg = DataConfig(source=DataSource.text, path=str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match="too few"):
        load_token_data(cfg, 64, 256)


def test_unigram_entropy_bits():
    assert unigram_entropy_bits(np.arange(256) % 4, 256) == pytest.approx(2.0)
    assert unigram_entropy_bits(np.zeros(10, np.int64), 256) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    expected = -(p * np.log2(p)).sum()
    assert unigram_entropy_bits(np.array([0, 0, 1, 2]), 3) == pytest.approx(expected)


def test_digits_split_and_epoch_shuffle_visit_each_sample_once():
    data = load_digits_data(DataConfig(source=DataSource.digits, val_fraction=0.2))
    n = len(data.x_train)
    assert len(data.x_val) == math.ceil(1797 * 0.2) and n + len(data.x_val) == 1797
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    # Batches that tile one epoch exactly hold every training sample exactly once.
    bs = next(b for b in range(400, 0, -1) if n % b == 0)
    seen = np.concatenate([data.train_batch(0, s, bs)["x"] for s in range(n // bs)])
    assert Counter(r.tobytes() for r in seen) == Counter(r.tobytes() for r in data.x_train)
    next_epoch = data.train_batch(0, n // bs, bs)["x"]
    assert not np.array_equal(next_epoch, seen[:bs])  # each epoch has its own order
    a = data.train_batch(5, 3, 32)
    np.testing.assert_array_equal(a["y"], data.train_batch(5, 3, 32)["y"])
