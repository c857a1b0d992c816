"""The transform protocol (sparsejax.transforms): the registry builds specs from config
blocks and names the offending field, the pipeline refuses incompatible combinations, a
Linear runs its stages in the stated order, state and metrics travel by name, and a method
defined in one place (here, in this file) trains, logs and checkpoints with nothing else
edited."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError, load_config
from sparsejax.loop import Trainer
from sparsejax.nn import Linear, apply_rules, layer_metrics, loss_terms, param_labels
from sparsejax.runs import load_model
from sparsejax.train import run
from sparsejax.transforms import (
    Context,
    ParamGroup,
    Site,
    SpecError,
    Transform,
    build_spec,
    methods,
    register,
    rule_specs,
    select_matmul,
    spec_fields,
)
from sparsejax.transforms.analog import AnalogSpec
from sparsejax.transforms.quant import DAT
from sparsejax.transforms.sparsity import SSTE, STE, MaskLLM


@register("quant", "test_scale")
@dataclass(frozen=True, kw_only=True)
class ScaleByLearnedFactor(Transform):
    """A toy method: the weight times a trainable scalar (own optimiser group, x10 rate),
    a call counter in its state, a loss term pulling the factor to 1, and a metric."""

    start: float = 0.5
    roles = ("weights", "activations")
    loss_terms = ("pull",)

    def params(self, site, x, key):
        return {"factor": jnp.asarray(self.start, jnp.float32)}

    def param_group(self):
        return ParamGroup("test_factor", lr_mult=10.0)

    def init(self, site, x, key):
        return {"calls": jnp.zeros((), jnp.uint32)}

    def apply(self, x, params, state, site, ctx):
        factor = params["factor"]
        metrics = {"pull": 0.1 * jnp.square(factor - 1.0), "factor": factor}
        return x * factor, {"calls": state["calls"] + 1}, metrics


def test_registered_methods_are_listed_by_kind():
    assert {"dense", "ste", "sr_ste", "sste", "maskllm"} <= set(methods("sparsity"))
    assert {"dat", "absmax_ste", "lsq", "fp8", "test_scale"} <= set(methods("quant"))
    assert methods("analog") == ("tile",)


def test_config_block_builds_the_spec_and_its_defaults_fill_the_rest():
    spec = build_spec("sparsity", {"method": "sste", "n": 1, "m": 4})
    assert spec == SSTE(n=1, m=4)
    assert spec_fields(spec) == {"method": "sste", "n": 1, "m": 4, "mvue": False,
                                 "fp8": False, "kernel": "xla"}
    assert build_spec("sparsity", {}) == SSTE()  # the kind's default method
    assert build_spec("quant", {"bits": 2}) == DAT(bits=2.0)


@pytest.mark.parametrize("block, field, unknown", [
    ({"method": "ste", "n": "two"}, "n", False),  # types are checked ...
    ({"method": "ste", "mvue": 1}, "mvue", False),
    ({"method": "sr_ste", "decay": float("nan")}, "decay", False),  # ... floats finite
    ({"method": "sr_ste", "decay": -1.0}, "decay", False),  # the method's own check
    ({"method": "ste", "nn": 2}, "nn", True),  # no method has it
    ({"method": "ste", "decay": 1e-3}, "decay", False),  # SR-STE's, set: refused
    ({"method": "nope"}, "method", False),
])
def test_bad_field_is_named(block, field, unknown):
    with pytest.raises(SpecError) as err:
        build_spec("sparsity", block)
    assert err.value.field == field and err.value.unknown == unknown


def test_a_siblings_field_at_its_default_is_ignored():
    # what a config written for S-STE or SR-STE carries when the method is overridden
    assert build_spec("sparsity", {"method": "ste", "decay": 2e-4}) == STE()
    assert build_spec("sparsity", {"method": "dense", "n": 2, "m": 4}) == build_spec(
        "sparsity", {"method": "dense"})


def test_rule_errors_name_the_block_and_field():
    with pytest.raises(SpecError) as err:
        rule_specs({"path": ".*", "quant": {"weights": {"method": "dat", "bits": 3.5}}})
    assert err.value.field == "quant.weights.bits"
    # affine DAT cannot follow a method that prunes: named on the DAT block
    with pytest.raises(SpecError, match="affine") as err:
        rule_specs({"sparsity": {"method": "ste"}, "quant": {"weights": {"method": "dat"}}})
    assert err.value.field == "quant.weights.affine"
    # two transforms that both need their own matmul
    with pytest.raises(SpecError) as err:
        rule_specs({"sparsity": {"method": "sste", "fp8": True}, "analog": {"out_noise": 0.1}})
    assert err.value.field == "sparsity.fp8"


def test_matmul_selection_prefers_the_transform_that_insists():
    assert select_matmul([DAT()]) is None  # plain x @ W
    assert select_matmul([STE(), DAT(affine=False)]) == STE()
    tile = AnalogSpec(weight_noise=0.1)
    assert select_matmul([STE(), tile]) is tile  # the tile replaces the sparse layout ...
    assert select_matmul([STE(mvue=True)]) == STE(mvue=True)  # ... which MVUE needs


def test_config_errors_use_the_config_keys(tiny_gpt):
    with pytest.raises(ConfigError, match=r"unknown key 'rules\.0\.quant\.weights\.bitz' "
                                          r"\(did you mean 'rules\.N\.quant\.weights\.bits'"):
        tiny_gpt("rules=[{path: '.*', quant: {weights: {bitz: 4}}}]")
    with pytest.raises(ConfigError, match=r"'rules\.0\.quant\.weights\.start': start must be"):
        tiny_gpt("rules=[{path: '.*', quant: {weights: {method: test_scale, start: x}}}]")


def test_validated_config_records_every_field_of_the_method(tiny_gpt):
    cfg = tiny_gpt("rules=[{path: 'blocks/0/mlp/fc', sparsity: {method: maskllm}}]")
    assert cfg.rules[0].sparsity == spec_fields(MaskLLM())


def test_linear_runs_sparsify_then_quantise_and_records_named_metrics():
    lin = Linear(16, 8, rngs=nnx.Rngs(0))
    w = lin.kernel[...]
    lin.configure({"sparsity": STE(), "weight_quant": DAT(bits=4, affine=False, block_size=8)})
    x = jax.random.normal(jax.random.key(1), (3, 16))
    y = lin(x)
    pruned = lin.sparsity.inference(w)[0]
    quantised, stats = lin.weight_quant.inference(pruned)
    np.testing.assert_allclose(y, x @ quantised + lin.bias[...], rtol=1e-5, atol=1e-6)
    assert set(lin.weight_quant.metric_values()) == {"mse_naive", "mse", "scale", "clip_frac"}
    np.testing.assert_allclose(lin.weight_quant.metric_values()["mse"], stats["mse"], rtol=1e-6)


def _toy_model():
    model = nnx.Sequential(Linear(8, 8, rngs=nnx.Rngs(0)), Linear(8, 4, rngs=nnx.Rngs(1)))
    apply_rules(model, [{"path": "layers/0", "quant": {"weights": {"method": "test_scale"}}}])
    return model


def test_loss_terms_metrics_and_optimiser_groups_come_from_the_transforms():
    model = _toy_model()
    x = jnp.ones((2, 8))
    model(x)
    terms = loss_terms(model)
    assert set(terms) == {"pull"} and float(terms["pull"]) == pytest.approx(0.1 * 0.25)
    metrics = layer_metrics(model, model)
    assert float(metrics["quant/layers/0/weights/factor"]) == 0.5
    assert float(metrics["quant/weights/factor"]) == 0.5  # size-weighted over layers
    labels, groups = param_labels(model)
    assert groups == {"test_factor": ParamGroup("test_factor", 10.0)}
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert sorted(set(flat.values())) == ["test_factor", "weights"]
    assert [k for k, v in flat.items() if v == "test_factor"] == [
        "['layers'][0]['weight_quant']['params']['factor'].value"]
    # the layer's state advanced by name, no positions
    assert int(model.layers[0].weight_quant.state["calls"][...]) == 1


def test_a_method_defined_in_one_place_trains_logs_and_checkpoints(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rule = "rules=[{path: 'blocks/\\d+/mlp/fc', quant: {weights: {method: test_scale}}}]"
    cfg = load_config("configs/gpt_tiny.yaml", [
        rule, "train.steps=6", "train.eval_every=3", "train.eval_batches=1",
        "logging.log_every=3", "logging.progress=none", "data.max_bytes=100000",
        f"run_dir={tmp_path / 'run'}"])
    results = run(cfg, verbose=False)
    assert np.isfinite(results["val_loss"]) and "train_pull" in results
    # throughput counts the steps' run time, not their dispatch (measured after the sync)
    tokens = 6 * cfg.data.batch_size * cfg.model.block_size
    assert results["tokens_per_sec"] < 5 * tokens / results["loop_seconds"]
    model, _, step = load_model(tmp_path / "run")
    layer = model.blocks[0].mlp.fc
    assert step == 6 and int(layer.weight_quant.state["calls"][...]) == 6
    # trained in its own group (x10 rate) and pulled towards 1 by its loss term
    assert 0.5 < float(layer.weight_quant.params["factor"][...]) < 1.0
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/pull", "quant/weights/factor", "quant/blocks/0/mlp/fc/weights/factor"} \
        <= set(tags)


def test_trainer_runs_hooks_when_due_and_at_every_log_point():
    seen: dict[str, list[int]] = {"every3": [], "log": [], "end": []}
    trainer = Trainer(lambda state, step: (state + 1, {"x": np.float32(step)}), log_every=2)
    trainer.add_hook(lambda info: seen["every3"].append(info.step), every=3)
    trainer.add_hook(lambda info: seen["log"].append((info.step, len(info.host))))
    trainer.add_hook(lambda info: seen["end"].append(info.step), every=100, at_end=True)
    assert trainer.run(0, 0, 7) == 7
    assert seen["every3"] == [3, 6]
    # log points: every 2, when a hook is due, and the last step; each sees its steps
    assert seen["log"] == [(2, 2), (3, 1), (4, 1), (6, 2), (7, 1)]
    assert seen["end"] == [7] and trainer.train_steps == 7


def test_site_and_context_describe_where_and_how_a_transform_runs():
    site = Site("weights", (16, 8))
    assert site.axis == 0 and site.size == 128
    assert Site("activations", (16,)).axis == -1
    ctx = Context(True, jax.random.key(0))
    y, state, metrics = STE().apply(jnp.arange(16.0).reshape(16, 1), {}, {}, site, ctx)
    assert float(jnp.mean(y == 0)) == 0.5 and state == {} and metrics == {}
