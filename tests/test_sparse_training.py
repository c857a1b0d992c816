"""N:M rules end to end: a tiny GPT trains with each method, its effective weights are
valid N:M, S-STE's beta stays frozen, the per-layer metrics reach TensorBoard, and a
resumed sparse run (MVUE counters included) is bitwise identical."""

from __future__ import annotations

import shutil

import chex
import numpy as np
import pytest

from sparsejax.nn import sparse_layers
from sparsejax.runs import init_model, load_model
from sparsejax.train import run

FFN_RULE = ("rules=[{{path: 'blocks/\\d+/mlp/(fc|proj)', "
            "sparsity: {{method: {method}, n: {n}, m: {m}, mvue: {mvue}}}}}]")


def rule(method="sste", n=2, m=4, mvue=False):
    return FFN_RULE.format(method=method, n=n, m=m, mvue=str(mvue).lower())


@pytest.mark.parametrize("method, n, m, mvue", [
    ("sste", 2, 4, False), pytest.param("sste", 2, 4, True, marks=pytest.mark.slow),
    ("ste", 2, 4, False), ("sr_ste", 2, 4, False),
    pytest.param("sste", 1, 4, False, marks=pytest.mark.slow),
    pytest.param("sste", 4, 8, False, marks=pytest.mark.slow)])
def test_sparse_training_keeps_exactly_n_per_group(tiny_gpt, tmp_path, method, n, m, mvue):
    cfg = tiny_gpt(rule(method, n, m, mvue), "train.steps=20")
    results = run(cfg, verbose=False)
    assert np.isfinite(results["val_loss"]) and results["val_loss"] < np.log(256)
    model, _, step = load_model(tmp_path / "run")
    layers = sparse_layers(model)
    assert step == 20 and len(layers) == 4
    initial = dict(sparse_layers(init_model(cfg)))
    for path, layer in layers:
        w_eff = np.asarray(layer.effective_kernel())
        groups = np.moveaxis(w_eff, 0, -1).reshape(-1, m)
        np.testing.assert_array_equal((groups != 0).sum(-1), n, err_msg=path)
        assert not np.array_equal(layer.kernel[...], initial[path].kernel[...])  # it trained
        if method == "sste":  # frozen at its initial value, carried by the checkpoint
            beta = float(layer.sparsity.state["beta"][...])
            assert beta == float(initial[path].sparsity.state["beta"][...]) > 1.0
        if mvue:
            assert int(layer.sparsity.state["count"][...]) == 20


def test_sparsity_metrics_reach_tensorboard(tiny_gpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_gpt(rule("sste")), verbose=False)
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for metric in ("sparsity", "flip_rate", "near_threshold"):
        assert f"sparsity/{metric}" in tags
        assert f"sparsity/blocks/1/mlp/proj/{metric}" in tags
    assert "sparsity/blocks/0/mlp/fc/beta" in tags
    assert "sparsity/blocks/0/attn/qkv/flip_rate" not in tags  # dense layers are not listed
    realised = [e.value for e in acc.Scalars("sparsity/sparsity")]
    # 2:4 -> half zeros; S-STE can add a zero when a kept magnitude ties with tau exactly.
    assert all(0.5 <= v < 0.5 + 1e-4 for v in realised)
    flips = [e.value for e in acc.Scalars("sparsity/flip_rate")]
    assert all(0.0 <= v < 0.5 for v in flips) and max(flips) > 0.0


def test_dense_run_logs_no_sparsity_metrics(tiny_gpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_gpt("train.steps=10"), verbose=False)
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("sparsity/")]


@pytest.mark.parametrize("method, mvue", [
    pytest.param("sste", True, marks=pytest.mark.slow),
    pytest.param("maskllm", False, marks=pytest.mark.slow)])
def test_resumed_stochastic_sparse_run_is_bitwise_identical(tiny_gpt, tmp_path, method, mvue):
    # MVUE draws and MaskLLM's Gumbel draws and schedules are keyed by checkpointed counters
    args = (rule(method, mvue=mvue), "train.steps=20", "checkpoint.every=10")
    run(tiny_gpt(*args, run_dir=tmp_path / "a"), verbose=False)
    run(tiny_gpt(*args, run_dir=tmp_path / "b"), verbose=False)
    # Lose the end of run b as a crash would: resume from step 10.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
    (tmp_path / "b" / "results.json").unlink()
    resumed = run(tiny_gpt(*args, run_dir=tmp_path / "b"), verbose=False)
    assert resumed["resumed_from"] == 10
    a, _, _ = load_model(tmp_path / "a")
    b, _, _ = load_model(tmp_path / "b")
    from flax import nnx

    chex.assert_trees_all_equal(nnx.state(a), nnx.state(b))
