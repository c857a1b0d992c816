"""``sparsejax prune``: a trained run pruned with calibration data becomes a run directory
that loads, compares and fine-tunes with its masks; sequential calibration; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.calibration import calibration_batches, input_grams
from sparsejax.cli import main
from sparsejax.nn import named_layers, transform_slots
from sparsejax.posttrain import prune_layer, prune_model
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from tests.conftest import TINY_GPT
from tests.test_train import _restore_raw, clean_and_killed_runs

BLOCKS = "blocks/.*"


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    from sparsejax.config import load_config

    run_dir = tmp_path_factory.mktemp("dense") / "run"
    run(load_config(None, [*TINY_GPT, f"run_dir={run_dir}", "name=dense", "train.steps=40",
                           "checkpoint.every=40"]), verbose=False)
    return run_dir


def _prune(dense_run: Path, out: Path, *args: str) -> int:
    return main(["prune", str(dense_run), "--out", str(out), "--layers", BLOCKS,
                 "--calib-batches", "2", "--quiet", *args])


def test_prune_writes_a_run_with_the_pattern_and_prints_the_loss_before_and_after(
        dense_run, tmp_path, capsys):
    out = tmp_path / "sparsegpt24"
    assert _prune(dense_run, out, "--method", "sparsegpt", "--nm", "2:4", "--parallel") == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "prune.json").read_text())
    assert f"validation loss {report['before']['loss']:.4f} -> {report['after']['loss']:.4f}" \
        in printed
    model, cfg, step = load_model(out)
    dense, _, _ = load_model(dense_run)
    assert step == 0 and cfg.rules[0].prune["method"] == "sparsegpt"
    pruned = {p for p, _, _, s in transform_slots(model) if s.spec.calibrated}
    assert pruned == {p for p, _ in named_layers(model) if p.startswith("blocks/")}
    old = dict(named_layers(dense))
    for path, layer in named_layers(model):
        w = np.asarray(layer.effective_kernel())
        if path in pruned:
            assert np.all((w != 0).reshape(-1, 4, w.shape[1]).sum(1) <= 2)
            assert bool(layer.sparsity.state["pruned"][...])
        else:  # layers the rule does not match are the dense run's
            np.testing.assert_array_equal(w, np.asarray(old[path].effective_kernel()))
    assert report["density"] == 0.5 and len(report["per_layer"]) == len(pruned)


@pytest.mark.parametrize("sequential", [True, False])
def test_each_layer_is_calibrated_on_the_inputs_the_pruned_earlier_layers_give(
        dense_run, sequential):
    """Sequential: layer ``l`` is pruned from ``H`` of its inputs with every earlier layer
    pruned, which is ``H`` of the *final* model (later layers do not change its inputs);
    parallel: from ``H`` of the dense model."""
    dense, cfg, _ = load_model(dense_run)
    cfg.rules = [{"path": BLOCKS, "prune": {"method": "wanda", "sparsity": 0.5}}]
    cfg.train.init_from = str(dense_run)
    model = init_model(cfg)
    batches = calibration_batches(cfg, 2)
    prune_model(model, batches, sequential=sequential)
    paths = [p for p, _ in named_layers(model) if p.startswith("blocks/")]
    grams = input_grams(model if sequential else dense, batches, paths)
    dense_layers = dict(named_layers(dense))
    differs = 0
    for path, layer in named_layers(model):
        if path in paths:
            w = dense_layers[path].kernel[...]
            expected = prune_layer("wanda", w, grams[path], sparsity=0.5).mask
            np.testing.assert_array_equal(np.asarray(layer.sparsity.state["mask"][...]),
                                          np.asarray(expected))
            dense_h = input_grams(dense, batches, [path])[path]
            differs += not np.allclose(np.asarray(grams[path]), np.asarray(dense_h))
    assert differs > 0 if sequential else differs == 0  # later layers did see the pruning


def test_fine_tuning_from_a_pruned_run_keeps_its_masks_and_factors(dense_run, tmp_path):
    from sparsejax.config import load_config

    pruned = tmp_path / "dsf"
    assert _prune(dense_run, pruned, "--method", "dsf", "--sparsity", "0.6",
                  "--option", "rounds=2", "--parallel") == 0
    cfg = load_config(pruned / "config.yaml", [f"train.init_from={pruned}", "train.steps=3",
                                                f"run_dir={tmp_path / 'ft'}", "name=ft",
                                                "checkpoint.every=3", "train.eval_every=3",
                                                "logging.progress=none"])
    run(cfg, verbose=False)
    before, _, _ = load_model(pruned)
    after, _, _ = load_model(tmp_path / "ft")
    old = {(p, s): sl for p, _, s, sl in transform_slots(before)}
    checked = 0
    for path, layer, stage, slot in transform_slots(after):
        if not slot.spec.calibrated:
            continue
        mine = old[(path, stage)]
        for name in ("mask", "factor_mask"):
            np.testing.assert_array_equal(slot.state[name][...], mine.state[name][...])
        kernel, factor = layer.kernel[...], slot.params["factor"][...]
        assert not np.allclose(kernel, dict(named_layers(before))[path].kernel[...])
        assert np.all(np.asarray(jnp.where(slot.state["mask"][...], 0.0, kernel)) == 0)
        assert np.all(np.asarray(jnp.where(slot.state["factor_mask"][...], 0.0, factor)) == 0)
        checked += 1
    assert checked == 8


def test_a_prune_rule_on_weights_never_pruned_is_refused(dense_run, tmp_path):
    from sparsejax.config import ConfigError, load_config

    cfg = load_config(None, [*TINY_GPT, f"run_dir={tmp_path / 'r'}",
                             f"train.init_from={dense_run}",
                             "rules=[{path: 'blocks/.*', prune: {method: wanda}}]"])
    with pytest.raises(ConfigError, match="was never pruned"):
        run(cfg, verbose=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,needle", [
    (["--method", "obs", "--sparsity", "0.5"], "--method 'obs' is not one of"),
    (["--method", "wanda", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--method", "wanda", "--nm", "2:3"], "not divisible by m=3"),
    (["--method", "wanda", "--nm", "two:four"], "--nm must be N:M"),
    (["--method", "dsf", "--nm", "2:4"], "'--nm'"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--option", "blocksise=8"],
     "'--option blocksise'"),
    (["--method", "wanda", "--sparsity", "0.5", "--layers", "attn/.*"], "matches no layer"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-batches", "0"],
     "--calib-batches must be >= 1"),
], ids=["method", "sparsity", "pattern", "nm-syntax", "dsf-nm", "option", "layers", "calib"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(dense_run, tmp_path, capsys, args,
                                                         needle):
    out = tmp_path / "out"
    code = main(["prune", str(dense_run), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial"))


def test_an_existing_output_or_a_run_without_checkpoints_is_refused(dense_run, tmp_path,
                                                                   capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _prune(dense_run, out, "--method", "wanda", "--sparsity", "0.5") == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((dense_run / "config.yaml").read_text())
    assert _prune(empty, tmp_path / "o2", "--method", "wanda", "--sparsity", "0.5") == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_and_evaluate_analog_read_a_pruned_run(dense_run, tmp_path, capsys):
    out = tmp_path / "wanda"
    assert _prune(dense_run, out, "--method", "wanda", "--sparsity", "0.5") == 0
    assert main(["compare", str(dense_run / "checkpoints" / "40"),
                 str(out / "checkpoints" / "0"), "--logdir", str(tmp_path / "tb")]) == 0
    printed = capsys.readouterr().out
    assert "sparsity" in printed
    assert main(["evaluate-analog", str(out), "--times", "60", "--repeats", "1", "--quiet",
                 "--out", str(tmp_path / "analog")]) == 0


# --------------------------------------------------------------------------- kill -9


def _finetune_cmd(pruned: Path, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "sparsejax", "train", str(pruned / "config.yaml"),
            f"train.init_from={pruned}", f"train.steps={steps}", "checkpoint.every=10",
            "checkpoint.keep=2", "train.eval_every=1000", "model.dropout=0.1",
            f"run_dir={run_dir}", "name=ft", "logging.progress=none"]


@pytest.mark.slow
def test_a_pruned_then_fine_tuned_run_resumes_bitwise_after_kill_9(dense_run, tmp_path):
    pruned = tmp_path / "sparsegpt"
    assert _prune(dense_run, pruned, "--method", "sparsegpt", "--sparsity", "0.5") == 0
    steps = 300
    clean, killed = clean_and_killed_runs(
        lambda run_dir: _finetune_cmd(pruned, run_dir, steps), tmp_path)
    assert 30 <= json.loads((killed / "results.json").read_text())["resumed_from"] < steps
    a, _ = _restore_raw(clean, steps)
    b, _ = _restore_raw(killed, steps)
    chex.assert_trees_all_equal(a, b)
    model, _, _ = load_model(killed)
    source, _, _ = load_model(pruned)
    masks = {p: s.state["mask"][...] for p, _, _, s in transform_slots(source)
             if s.spec.calibrated}
    for path, layer, _, slot in transform_slots(model):
        if path in masks:  # the masks survived fine-tuning and the restart
            np.testing.assert_array_equal(slot.state["mask"][...], masks[path])
            assert np.all(np.asarray(jnp.where(masks[path], 0.0, layer.kernel[...])) == 0)
    assert jax.tree.leaves(a)
