"""Gradient accumulation (``train.grad_accum``): k micro-batches inside the jitted step give
the full batch's loss and update (float32 tolerance), with gradient-time hooks and
transforms; a batch that does not split is refused with one line."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError, load_config
from sparsejax.optim import build_optimizer
from sparsejax.runs import init_model
from sparsejax.tasks import build_task
from sparsejax.train import make_train_step, run
from tests.conftest import TINY_GPT

RIGL = "rules=[{path: 'blocks/\\d+/mlp/fc', sparsity: {method: rigl, sparsity: 0.8, dt: 1}}]"
SSTE = "rules=[{path: 'blocks/\\d+/mlp/(fc|proj)', sparsity: {method: sste}}]"


def one_step(overrides: list[str], grad_accum: int, steps: int = 2):
    cfg = load_config(None, [*TINY_GPT, *overrides])
    task = build_task(cfg)
    model = init_model(cfg)
    tx, _, frozen = build_optimizer(cfg, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state, rng = tx.init(params), jax.random.key_data(jax.random.key(0))
    step_fn = jax.jit(make_train_step(graphdef, task, tx, cfg.model.dropout > 0, frozen,
                                      grad_accum))
    history = []
    for step in range(1, steps + 1):
        params, rest, opt_state, metrics = step_fn(params, rest, opt_state, rng,
                                                   task.train_batch(step), np.int32(step))
        history.append(jax.device_get(metrics))
    return jax.device_get(params), history


@pytest.mark.parametrize("extra", [[], [SSTE], [RIGL]], ids=["dense", "sste", "rigl-hook"])
@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_accumulated_step_equals_the_full_batch_step(extra, k):
    full_params, full = one_step(extra, 1)
    acc_params, acc = one_step(extra, k)
    for a, b in zip(full, acc, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for x, y in zip(jax.tree.leaves(full_params), jax.tree.leaves(acc_params), strict=True):
        np.testing.assert_allclose(y, x, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_accumulation_with_dropout_differs_per_micro_batch_but_trains():
    _, one = one_step(["model.dropout=0.1"], 1)
    _, four = one_step(["model.dropout=0.1"], 4)
    assert np.isfinite(four[-1]["loss"]) and four[-1]["loss"] != one[-1]["loss"]


@pytest.mark.slow
def test_a_run_with_accumulation_resumes_from_one_without(tmp_path):
    base = [*TINY_GPT, "train.steps=20", f"run_dir={tmp_path / 'r'}", "name=r"]
    run(load_config(None, base), verbose=False)
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "20")  # as if stopped after step 10
    # the same update in micro-batches: grad_accum may change on resume
    results = run(load_config(None, [*base, "train.grad_accum=4"]), verbose=False)
    assert results["resumed_from"] == 10 and np.isfinite(results["val_loss"])


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(ConfigError, match=r"train.grad_accum.*data.batch_size=8 is not "
                                          r"divisible by 3 micro-batches"):
        load_config(None, [*TINY_GPT, "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="train.grad_accum.*must be > 0"):
        load_config(None, [*TINY_GPT, "train.grad_accum=0"])
