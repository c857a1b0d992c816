"""Shared fixtures: tiny configs that compile and train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Compiled executables are shared by every test, both xdist workers, the CLI subprocesses
# and later runs on this machine through JAX's persistent cache: most tests compile the same
# few tiny train steps, and on 2 CPU cores compiling is two thirds of their time (the
# default suite: 8m17s with an empty cache, 2m58s with a warm one). The key covers the
# program, the JAX version, the backend and the flags, so a hit runs the identical
# executable (same numbers). Set before JAX first compiles; the environment reaches the
# subprocesses. JAX_COMPILATION_CACHE_DIR chooses another place. No size bound: JAX's LRU
# eviction scans the directory under a file lock at every write, which made the suite
# slower than no cache at all; a full run adds about 60 MB per code version (delete the
# directory to reclaim it).
_CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
JAX_CACHE = {"JAX_COMPILATION_CACHE_DIR": str(_CACHE_HOME / "sparsejax" / "jax-tests"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
for _key, _value in JAX_CACHE.items():
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import pytest  # noqa: E402

from sparsejax.config import Config, load_config  # noqa: E402

# in case JAX was imported before this file
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
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
