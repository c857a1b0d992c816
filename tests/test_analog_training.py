"""Analog layers in models, configs and runs; ``sparsejax evaluate-analog``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.models import GPT
from sparsejax.nn import Activation, Linear, analog_layers, apply_rules, named_layers
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from sparsejax.transforms.analog import AnalogSpec
from tests.conftest import REPO

WEIGHT_NOISE = ("rules=[{path: 'layers/.*|head', analog: {weight_noise: 0.06, out_noise: 0.04, "
                "dac_bits: 8, adc_bits: 8, clip_alpha: 2.5}}, "
                "{path: 'acts/.*', analog: {act_noise: 0.1, act_noise_correlated: true}}]")
GPT_ANALOG = ("rules=[{path: 'blocks/\\d+/(attn|mlp)/.*', analog: {weight_noise: 0.06, "
              "act_noise: 0.05}}]")


@pytest.mark.parametrize("override, needle", [
    ("rules=[{path: '.*', analog: {weight_noise_kind: gauss}}]",
     "'rules.0.analog.weight_noise_kind'"),
    ("rules=[{path: '.*', analog: {dac_bits: 1}}]", "'rules.0.analog.dac_bits'"),
    ("rules=[{path: '.*', analog: {weight_nois: 0.1}}]", "rules.N.analog.weight_noise"),
    ("rules=[{path: '.*', sparsity: {mvue: true}, analog: {weight_noise: 0.1}}]",
     "'rules.0.sparsity.mvue'"),
])
def test_bad_analog_config_is_one_line_naming_the_key(tiny_gpt, override, needle):
    with pytest.raises(ConfigError) as err:
        tiny_gpt(override)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_activation_noise_rule_that_matches_no_activation_is_an_error(tiny_gpt):
    cfg = tiny_gpt("rules=[{path: 'blocks/\\d+/mlp/fc', analog: {act_noise: 0.1}}]")
    with pytest.raises(ConfigError, match=r"rules.0.analog.act_noise .* matches no activation "
                       r"layer; activation paths are: blocks/0/mlp/act, blocks/1/mlp/act"):
        init_model(cfg)


def test_sparsity_rules_leave_activations_to_analog_rules(tiny_gpt):
    cfg = tiny_gpt("rules=[{path: 'blocks/.*', sparsity: {method: sste}}, "
                   "{path: '.*/act', analog: {act_noise: 0.1}}]")
    model = init_model(cfg)
    layers = dict(analog_layers(model))
    assert sorted(layers) == ["blocks/0/mlp/act", "blocks/1/mlp/act"]
    assert all(isinstance(m, Activation) and m.analog.spec.act_noise == 0.1
               for m in layers.values())
    assert all(m.sparsity is not None for _, m in named_layers(model))


def _gpt(spec: AnalogSpec | None) -> GPT:
    model = GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32,
                rngs=nnx.Rngs(params=0))
    if spec is not None:
        apply_rules(model, [type("R", (), {"path": ".*", "analog": spec})()])
    return model


def test_noise_is_off_in_evaluation_and_fresh_in_every_training_call():
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    clean = _gpt(None)(ids)
    noisy = _gpt(AnalogSpec(weight_noise=0.06, act_noise=0.1))
    first, second = noisy(ids), noisy(ids)
    assert not np.allclose(first, clean) and not np.allclose(first, second)
    noisy.eval()
    np.testing.assert_allclose(noisy(ids), clean, rtol=1e-6, atol=1e-6)
    asked = _gpt(AnalogSpec(weight_noise=0.06, noise_in_eval=True))
    asked.eval()
    assert not np.allclose(asked(ids), clean)


def test_noise_draws_are_a_function_of_the_seed_and_the_call_counter():
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    a, b = (_gpt(AnalogSpec(weight_noise=0.06, act_noise=0.1)) for _ in range(2))
    np.testing.assert_array_equal(a(ids), b(ids))
    counters = [m.analog.state["count"][...] for _, m in analog_layers(a)]
    assert all(int(c) == 1 for c in counters)


def test_linear_analog_weights_replace_the_effective_weight():
    lin = Linear(8, 4, rngs=nnx.Rngs(params=0))
    x = jnp.ones((2, 8))
    lin.set_weight_override(jnp.full((8, 4), 0.5))
    np.testing.assert_allclose(lin(x), jnp.full((2, 4), 4.0))
    lin.set_weight_override(None)
    np.testing.assert_allclose(lin(x), x @ lin.kernel[...], rtol=1e-6)
    with pytest.raises(ValueError, match=r"override weights of shape \(4, 8\)"):
        lin.set_weight_override(jnp.zeros((4, 8)))


@pytest.mark.slow
def test_identical_seeds_give_identical_noisy_runs_and_resume_bitwise(tiny_mlp, tmp_path):
    args = (WEIGHT_NOISE, "train.steps=20", "checkpoint.every=10")
    ra = run(tiny_mlp(*args, run_dir=tmp_path / "a"), verbose=False)
    rb = run(tiny_mlp(*args, run_dir=tmp_path / "b"), verbose=False)
    assert ra["val_loss"] == rb["val_loss"]
    clean = run(tiny_mlp("train.steps=20", run_dir=tmp_path / "clean"), verbose=False)
    assert clean["val_loss"] != ra["val_loss"]
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")  # crash after step 10, resume
    (tmp_path / "b" / "results.json").unlink()
    assert run(tiny_mlp(*args, run_dir=tmp_path / "b"), verbose=False)["resumed_from"] == 10
    a, _, _ = load_model(tmp_path / "a")
    b, _, _ = load_model(tmp_path / "b")
    chex.assert_trees_all_equal(nnx.state(a), nnx.state(b))


@pytest.mark.slow
def test_bfloat16_analog_gpt_run_is_finite_and_learns(tiny_gpt):
    results = run(tiny_gpt(GPT_ANALOG, "model.dtype=bfloat16", "train.steps=30"),
                  verbose=False)
    assert np.isfinite(results["val_loss"])
    assert results["val_loss"] < np.log(256) - 0.5  # below the uniform byte model


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory):
    from sparsejax.config import load_config
    from tests.conftest import TINY_MLP

    run_dir = tmp_path_factory.mktemp("analog") / "run"
    run(load_config(None, [*TINY_MLP, f"run_dir={run_dir}", "name=tiny_mlp",
                           "train.steps=60"]), verbose=False)
    return run_dir


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsejax", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_evaluate_analog_writes_the_table_and_tensorboard(trained_mlp, tmp_path):
    out = tmp_path / "report"
    proc = _cli("evaluate-analog", str(trained_mlp), "--times", "60,1d,1y", "--repeats", "3",
                "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["time", "digital", "1m", "1d", "1y"]
    rows = list(__import__("csv").DictReader(open(out / "analog_eval.csv")))
    assert [r["repeats"] for r in rows] == ["1", "3", "3", "3"]
    alphas = [float(r["alpha_mean"]) for r in rows[1:]]
    assert 1.0 < alphas[0] < alphas[1] < alphas[2]  # drift grows, compensation follows
    assert all(float(r["loss_std"]) > 0 for r in rows[1:])  # chips differ
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    steps = [e.step for e in events.Scalars("analog/accuracy_mean")]
    assert steps == [60, 86400, 31536000]


@pytest.mark.slow
def test_evaluate_analog_is_reproducible_and_seed_dependent(trained_mlp):
    from sparsejax.analog_eval import evaluate_analog

    model, cfg, _ = load_model(trained_mlp)
    kwargs = {"times": [3600.0], "repeats": 2}
    a = evaluate_analog(model, cfg, seed=0, **kwargs)
    b = evaluate_analog(model, cfg, seed=0, **kwargs)
    c = evaluate_analog(model, cfg, seed=1, **kwargs)
    assert a == b and a[1]["loss_mean"] != c[1]["loss_mean"]
    assert a[0]["loss_mean"] == pytest.approx(json.loads(
        (trained_mlp / "results.json").read_text())["val_loss"], rel=1e-5)


@pytest.mark.parametrize("args, needle", [
    (["--times", "60,soon"], "bad --times entry 'soon'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--layers", "nothing"], "--layers 'nothing' matches no linear layer"),
])
def test_evaluate_analog_bad_input_is_one_line_and_exit_2(trained_mlp, args, needle):
    before = sorted(p.name for p in trained_mlp.iterdir())
    proc = _cli("evaluate-analog", str(trained_mlp), *args, "--quiet")
    assert proc.returncode == 2 and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in trained_mlp.iterdir()) == before


def test_evaluate_analog_refuses_an_existing_report_directory(trained_mlp, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = _cli("evaluate-analog", str(trained_mlp), "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
