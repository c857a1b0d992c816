"""RigL (sparsity method ``rigl``): gradient-guided regrowth, its schedule, its metrics,
and bitwise resumption across mask updates."""

from __future__ import annotations

import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.runs import load_model
from sparsejax.train import run
from sparsejax.transforms.sparsity import RigL
from sparsejax.transforms.sparsity.rigl import rigl_drop_fraction
from tests.unstructured_helpers import hook, mask_of, rule, sparse_linear


def test_drop_fraction_follows_the_cosine_schedule():
    for t in (0, 25, 50, 75, 100):
        want = 0.3 / 2 * (1 + np.cos(np.pi * t / 100))
        assert float(rigl_drop_fraction(t, 0.3, 100)) == pytest.approx(want, abs=1e-6)


def test_grows_exactly_the_largest_gradient_inactive_entries():
    lin = sparse_linear(RigL(sparsity=0.5, alpha=0.5, dt=10, end_fraction=1.0),
                        shape=(8, 4), total_steps=100)
    old = mask_of(lin).copy()
    w = np.abs(np.asarray(lin.kernel[...]))
    grad = np.zeros((8, 4), np.float32)
    inactive = np.flatnonzero(~old.ravel())
    rng = np.random.default_rng(0)
    grad.ravel()[inactive] = rng.permutation(len(inactive)) + 1.0  # distinct magnitudes
    grad.ravel()[np.flatnonzero(old.ravel())] = 100.0  # active: huge, must be ignored
    hook(lin, grad, step=10)
    count = round(float(rigl_drop_fraction(10, 0.5, 100)) * 16)
    mask = mask_of(lin)
    grown = np.flatnonzero((mask & ~old).ravel())
    want = inactive[np.argsort(-grad.ravel()[inactive], kind="stable")[:count]]
    assert sorted(grown) == sorted(want)
    dropped = old & ~mask
    assert dropped.sum() == count and w[dropped].max() <= w[old & mask].min()
    assert np.all(np.asarray(lin.kernel[...]).ravel()[grown] == 0)
    stats = lin.sparsity.metric_values()
    assert float(stats["grad_grown"]) == pytest.approx(grad.ravel()[want].mean())
    assert float(stats["grad_dropped"]) == pytest.approx(100.0)


def test_updates_stop_at_end_fraction():
    lin = sparse_linear(RigL(sparsity=0.5, dt=10, end_fraction=0.5), total_steps=100)
    grad = jnp.asarray(np.random.default_rng(1).standard_normal((32, 16)), jnp.float32)
    before = mask_of(lin).copy()
    hook(lin, grad, step=40)
    assert (mask_of(lin) != before).any()
    before = mask_of(lin).copy()
    for step in (50, 60, 90):
        hook(lin, grad, step)
    np.testing.assert_array_equal(mask_of(lin), before)


def test_bad_settings_are_one_line_naming_the_key(tiny_gpt):
    with pytest.raises(ConfigError, match=r"'rules\.0\.sparsity\.dt': dt must be > 0"):
        tiny_gpt(rule("rigl", dt=0))
    with pytest.raises(ConfigError, match=r"'rules\.0\.sparsity\.end_fraction'"):
        tiny_gpt(rule("rigl", end_fraction=1.2))


@pytest.mark.slow
@pytest.mark.parametrize("resume_from", [6, 9])  # right after the update at step 5; between
def test_resumed_rigl_run_is_bitwise_identical(tiny_gpt, tmp_path, resume_from):
    args = (rule("rigl", sparsity=0.8, distribution="erk", dt=5, end_fraction=1.0),
            "train.steps=18", "checkpoint.every=3", "checkpoint.keep=10")
    run(tiny_gpt(*args, run_dir=tmp_path / "a"), verbose=False)
    run(tiny_gpt(*args, run_dir=tmp_path / "b"), verbose=False)
    for step in range(resume_from + 3, 19, 3):  # lose the end of run b, as a crash would
        shutil.rmtree(tmp_path / "b" / "checkpoints" / str(step))
    (tmp_path / "b" / "results.json").unlink()
    resumed = run(tiny_gpt(*args, run_dir=tmp_path / "b"), verbose=False)
    assert resumed["resumed_from"] == resume_from
    a, _, _ = load_model(tmp_path / "a")
    b, _, _ = load_model(tmp_path / "b")
    chex.assert_trees_all_equal(nnx.state(a), nnx.state(b))
