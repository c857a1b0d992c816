"""``configs/gpt2_small.yaml`` builds at GPT-2 small's size (~124M parameters), shards over
two host devices and trains two steps at a tiny batch with gradient accumulation (slow:
each step pushes 4 x 1024 tokens through 124M parameters on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsejax.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt2_small.yaml"


def test_gpt2_small_config_has_the_published_shape():
    cfg = load_config(CONFIG)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024,
                                                                           50304)
    assert m.dtype == "bfloat16" and m.tie_embeddings
    tokens_per_step = cfg.data.batch_size * m.block_size
    assert tokens_per_step == 491_520 and cfg.data.batch_size // cfg.train.grad_accum == 12


@pytest.mark.slow
def test_gpt2_small_builds_shards_and_trains_two_steps(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, "-m", "sparsejax", "train", str(CONFIG), "train.steps=2",
           "data.batch_size=4", "train.grad_accum=2", "train.eval_every=2",
           "train.eval_batches=1", "optimizer.warmup_steps=1", "mesh.data=1", "mesh.fsdp=2",
           "checkpoint.every=2", "logging.log_every=1", "logging.progress=lines",
           f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 123.5e6 < results["params"] < 125e6
    assert "gpt2_small: 124.5M parameters, 4,096 tokens per step in 2 micro-batches" in \
        done.stdout
    assert results["steps"] == 2 and results["val_bpb"] > 0
