"""Quantisation rules end to end: config keys and their errors, a tiny GPT trained with
each method (weights on the low-precision grid, pruned zeros kept, LSQ's step learned),
and the per-layer diagnostics reaching TensorBoard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.nn import Linear, named_layers
from sparsejax.quant import STAT_NAMES
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from sparsejax.transforms.quant import DAT, LSQ
from sparsejax.transforms.sparsity import STE


def quantized_layers(model):
    return [(p, m) for p, m in named_layers(model)
            if m.weight_quant is not None or m.act_quant is not None]


def lsq_step(slot):
    return float(slot.params["step"][...])

LINEARS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"


def quant_rule(weights: str | None = None, activations: str | None = None,
               sparsity: str | None = None, path: str = LINEARS) -> str:
    parts = [f"path: '{path}'"]
    if sparsity:
        parts.append(f"sparsity: {sparsity}")
    tensors = [f"{k}: {v}" for k, v in (("weights", weights), ("activations", activations))
               if v]
    parts.append(f"quant: {{{', '.join(tensors)}}}")
    return f"rules=[{{{', '.join(parts)}}}]"


@pytest.mark.parametrize("override, needle", [
    ("rules.0.quant.weights.bits=3.5", "'rules.0.quant.weights.bits'"),
    ("rules.0.quant.weights.method=dta", "'rules.0.quant.weights.method'"),
    ("rules.0.quant.activations.block_size=0", "'rules.0.quant.activations.block_size'"),
    ("rules.0.quant.weights.lam=-1", "'rules.0.quant.weights.lam'"),
    ("rules.0.quant.weights.bitz=2", "did you mean 'rules.N.quant.weights.bits'"),
])
def test_bad_quant_key_is_one_line_naming_it(tiny_gpt, override, needle):
    with pytest.raises(ConfigError) as err:
        tiny_gpt(quant_rule("{method: dat, bits: 2}", "{method: dat, bits: 2}"), override)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_affine_dat_on_a_sparse_layer_is_refused(tiny_gpt):
    with pytest.raises(ConfigError, match="rules.0.quant.weights.affine"):
        tiny_gpt(quant_rule("{method: dat, bits: 4, affine: true}",
                            sparsity="{method: ste}"))


def test_lsq_with_one_bit_is_refused_naming_bits(tiny_gpt):
    with pytest.raises(ConfigError, match="rules.0.quant.weights.bits.*LSQ needs"):
        tiny_gpt(quant_rule("{method: lsq, bits: 1}"))


def test_rules_configure_only_the_matched_layers(tiny_gpt):
    model = init_model(tiny_gpt(quant_rule("{method: dat, bits: 2}", "{method: lsq, bits: 4}",
                                           path="blocks/0/mlp/fc")))
    layers = dict(quantized_layers(model))
    assert list(layers) == ["blocks/0/mlp/fc"]
    layer = layers["blocks/0/mlp/fc"]
    assert layer.weight_quant.spec == DAT(bits=2) and layer.act_quant.spec == LSQ(bits=4)
    assert "step" in layer.act_quant.params and not layer.weight_quant.params


SLOW = pytest.mark.slow  # one GPT run each: the default suite keeps DAT


@pytest.mark.parametrize("weights, activations, levels", [
    ("{method: dat, bits: 1}", "{method: dat, bits: 1}", 2),
    pytest.param("{method: dat, bits: 4}", "{method: dat, bits: 4}", 16, marks=SLOW),
    pytest.param("{method: dat, bits: 1.5, affine: false}", "{method: dat, bits: 4}", 3,
                 marks=SLOW),
    pytest.param("{method: absmax_ste, bits: 2}", "{method: absmax_ste, bits: 4}", 3,
                 marks=SLOW),
    pytest.param("{method: lsq, bits: 2}", "{method: lsq, bits: 4}", 4, marks=SLOW),
    pytest.param("{method: fp8, fmt: e4m3}", "{method: fp8, fmt: e5m2}", 256, marks=SLOW),
])
def test_quantised_training_runs_with_weights_on_the_grid(tiny_gpt, tmp_path, weights,
                                                          activations, levels):
    cfg = tiny_gpt(quant_rule(weights, activations), "train.steps=10")
    results = run(cfg, verbose=False)
    assert np.isfinite(results["val_loss"]) and results["val_loss"] < np.log(256)
    model, _, _ = load_model(tmp_path / "run")
    layers = quantized_layers(model)
    assert len(layers) == 8
    for path, layer in layers:
        w = np.asarray(layer.effective_kernel())
        # n_embd=32 < 128: one block per output column; at most `levels` values in it
        distinct = max(len(np.unique(w[:, j])) for j in range(w.shape[1]))
        assert distinct <= levels, path
        assert not np.allclose(w, layer.kernel[...]), path


@pytest.mark.slow
def test_lsq_steps_are_trained(tiny_gpt, tmp_path):
    cfg = tiny_gpt(quant_rule("{method: lsq, bits: 2}", "{method: lsq, bits: 4}"),
                   "train.steps=10")
    before = dict(quantized_layers(init_model(cfg)))
    run(cfg, verbose=False)
    model, _, _ = load_model(tmp_path / "run")
    for path, layer in quantized_layers(model):
        assert lsq_step(layer.weight_quant) != lsq_step(before[path].weight_quant)
        assert lsq_step(layer.act_quant) != lsq_step(before[path].act_quant)


@pytest.mark.slow
def test_sparse_then_quantised_layer_keeps_its_pruned_zeros(tiny_gpt, tmp_path):
    rule = quant_rule("{method: dat, bits: 4, affine: false}", "{method: dat, bits: 4}",
                      sparsity="{method: ste}", path="blocks/\\d+/mlp/(fc|proj)")
    run(tiny_gpt(rule, "train.steps=10"), verbose=False)
    model, _, _ = load_model(tmp_path / "run")
    for path, layer in quantized_layers(model):
        w = np.asarray(layer.effective_kernel())
        groups = np.moveaxis(w, 0, -1).reshape(-1, 4)
        assert np.all((groups != 0).sum(-1) <= 2), path
        assert np.mean(w == 0) >= 0.5


def test_quant_diagnostics_reach_tensorboard(tiny_gpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_gpt(quant_rule("{method: dat, bits: 2}", "{method: dat, bits: 2}"),
                 "train.steps=10"), verbose=False)
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tensor in ("weights", "activations"):
        for stat in ("mse_naive", "mse", "scale", "clip_frac"):
            assert f"quant/{tensor}/{stat}" in tags
            assert f"quant/blocks/1/mlp/proj/{tensor}/{stat}" in tags
    for tensor in ("weights", "activations"):  # denoising beats the naive dequantisation
        after = acc.Scalars(f"quant/{tensor}/mse")[-1].value
        before = acc.Scalars(f"quant/{tensor}/mse_naive")[-1].value
        assert 0 < after < before


@pytest.mark.slow
def test_bfloat16_quantised_run_is_finite(tiny_gpt):
    results = run(tiny_gpt(quant_rule("{method: dat, bits: 4}", "{method: dat, bits: 4}"),
                           "model.dtype=bfloat16", "train.steps=10"), verbose=False)
    assert np.isfinite(results["val_loss"])


def test_activation_quantisation_records_its_stats_in_the_layer():
    layer = Linear(64, 8, rngs=nnx.Rngs(0))
    layer.configure({"act_quant": DAT(bits=2, block_size=32)})
    x = jax.random.normal(jax.random.key(1), (5, 64))
    y = layer(x)
    stats = layer.act_quant.metric_values()
    assert set(stats) == set(STAT_NAMES)
    mse_naive, mse, scale, clip = (float(stats[k]) for k in STAT_NAMES)
    assert y.shape == (5, 8) and 0 < mse < mse_naive and scale > 0 and clip == 0
    q, _ = layer.act_quant.inference(x)  # same input, same quantised values
    np.testing.assert_allclose(y, q @ layer.kernel[...] + layer.bias[...], rtol=1e-5,
                               atol=1e-6)


def test_lsq_weights_init_from_the_kernel_after_sparsity():
    layer = Linear(64, 8, rngs=nnx.Rngs(0))
    layer.configure({"sparsity": STE(), "weight_quant": LSQ(bits=4)})
    want = 2 * float(jnp.mean(jnp.abs(layer.kernel[...]))) / np.sqrt(7)
    np.testing.assert_allclose(lsq_step(layer.weight_quant), want, rtol=1e-6)
