"""Shared fixtures: tiny configs that compile and train in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsejax.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_GPT = [
    "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
    "data.max_bytes=200000", "data.batch_size=8",
    "train.steps=30", "train.eval_every=10", "train.eval_batches=2",
    "optimizer.warmup_steps=5", "checkpoint.every=10", "logging.log_every=5",
    "logging.progress=none",
]
TINY_MLP = [
    "model.kind=mlp", "data.source=digits", "model.hidden=[32]", "data.batch_size=64",
    "train.steps=30", "train.eval_every=10", "optimizer.warmup_steps=5",
    "checkpoint.every=10", "logging.log_every=5", "logging.progress=none",
]


@pytest.fixture
def tiny_gpt(tmp_path: Path):
    """``tiny_gpt(*overrides) -> Config`` writing into a fresh run dir under tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None) -> Config:
        return load_config(None, [*TINY_GPT, f"run_dir={run_dir or tmp_path / 'run'}",
                                  "name=tiny", *overrides])

    return make


@pytest.fixture
def tiny_mlp(tmp_path: Path):
    def make(*overrides: str, run_dir: Path | None = None) -> Config:
        return load_config(None, [*TINY_MLP, f"run_dir={run_dir or tmp_path / 'run'}",
                                  "name=tiny_mlp", *overrides])

    return make
