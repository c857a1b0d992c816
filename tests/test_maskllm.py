"""MaskLLM (learned N:M masks, docs/methods.md §2): the candidate set, the Gumbel-softmax mask and
its gradient, the prior, the schedules, the layer's train/eval forms, the optimiser's
mask-only mode, config errors, and a frozen-weight run from a dense checkpoint."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError, OptimizerConfig
from sparsejax.nn import Linear, named_layers, param_labels
from sparsejax.optim import make_optimizer
from sparsejax.runs import init_model, load_model
from sparsejax.sparsity import (
    argmax_nm_mask,
    candidate_masks,
    gumbel_nm_mask,
    init_mask_logits,
    linear_schedule,
    mask_entropy,
    mask_logits_shape,
    nm_mask,
)
from sparsejax.train import run
from sparsejax.transforms.sparsity import MaskLLM

MASK_STAT_NAMES = ("regularizer", "entropy", "soft_hard_gap", "tau", "kappa")

PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]
FFN = "blocks/\\d+/mlp/(fc|proj)"


def maskllm_rule(**fields):
    extra = "".join(f", {k}: {v}" for k, v in fields.items())
    return f"rules=[{{path: '{FFN}', sparsity: {{method: maskllm{extra}}}}}]"


def assert_valid_nm(mask, n, m):
    mask = np.asarray(mask)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    groups = np.moveaxis(mask, 0, -1).reshape(-1, m)
    np.testing.assert_array_equal(groups.sum(-1), n)


@pytest.mark.parametrize("n, m", PATTERNS)
def test_candidate_set_is_every_pattern_with_exactly_n_kept(n, m):
    cands = candidate_masks(n, m)
    assert cands.shape == (math.comb(m, n), m)
    np.testing.assert_array_equal(cands.sum(-1), n)
    every = {p for p in itertools.product((0.0, 1.0), repeat=m) if sum(p) == n}
    assert {tuple(r) for r in cands} == every


@pytest.mark.parametrize("n, m", PATTERNS)
def test_soft_mask_mixes_candidates_and_hard_masks_are_valid(n, m):
    w = jax.random.normal(jax.random.key(0), (2 * m, 6))
    logits = jax.random.normal(jax.random.key(1), mask_logits_shape(w.shape, n, m))
    soft = np.asarray(gumbel_nm_mask(logits, jax.random.key(2), 1.0, 1.0, n=n, m=m))
    assert soft.shape == w.shape and soft.min() >= 0 and soft.max() <= 1
    assert 0 < soft.min() < soft.max() < 1  # a real mixture at tau = 1
    np.testing.assert_allclose(np.moveaxis(soft, 0, -1).reshape(-1, m).sum(-1), n, rtol=1e-5)
    assert_valid_nm(gumbel_nm_mask(logits, jax.random.key(2), 1.0, 1.0, n=n, m=m, hard=True),
                    n, m)
    hard = argmax_nm_mask(logits, n, m)
    assert_valid_nm(hard, n, m)
    best = candidate_masks(n, m)[np.argmax(np.asarray(logits), -1)]  # (out, G, m)
    np.testing.assert_array_equal(np.asarray(hard), best.reshape(6, -1).T)


@pytest.mark.parametrize("hard", [False, True])
def test_soft_mask_gradient_reaches_the_logits(hard):
    w = jax.random.normal(jax.random.key(0), (16, 8))
    logits = init_mask_logits(jax.random.key(1), w)

    def loss(lg):
        mask = gumbel_nm_mask(lg, jax.random.key(3), 4.0, 100.0, hard=hard)
        return jnp.sum((w * mask) ** 2)

    g = np.asarray(jax.grad(loss)(logits))
    assert np.isfinite(g).all() and np.mean(g != 0) > 0.9
    if not hard:  # minimising -sum (W*M)^2 moves the soft mask to larger magnitudes
        descended = logits - 1e-2 * (-jax.grad(loss)(logits))
        assert float(loss(descended)) > float(loss(logits))


def test_gumbel_draws_follow_the_categorical_of_the_scaled_logits():
    # Gumbel-max: the sampled candidate is distributed as softmax(kappa * logits).
    kappa, draws = 100.0, 20000
    logits = jnp.array([[[0.01, -0.005, 0.0, 0.012, -0.02, 0.003]]])  # one 2:4 group
    keys = jax.random.split(jax.random.key(0), draws)
    sample = jax.vmap(lambda k: gumbel_nm_mask(logits, k, 1.0, kappa, hard=True))(keys)
    picks = np.asarray(sample)[:, :, 0]  # (draws, 4)
    cands = candidate_masks(2, 4)
    index = np.array([np.flatnonzero((cands == p).all(-1))[0] for p in picks])
    freq = np.bincount(index, minlength=6) / draws
    expected = np.asarray(jax.nn.softmax(kappa * logits[0, 0]))
    se = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) < 5 * se)


def test_magnitude_prior_starts_at_the_magnitude_mask():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    magnitude = np.asarray(nm_mask(w)).astype(np.float32)
    strong = init_mask_logits(jax.random.key(1), w, prior_strength=10.0)
    np.testing.assert_array_equal(np.asarray(argmax_nm_mask(strong)), magnitude)
    # the default strength 3 is a soft bias: a neighbour (one shared position) is 0.03
    # behind, ~2 std of the N(0, 0.01) difference, so a few groups start elsewhere
    logits = init_mask_logits(jax.random.key(1), w, prior="magnitude", prior_strength=3.0)
    agree = np.mean(np.asarray(argmax_nm_mask(logits)) == magnitude)
    assert 0.95 < agree < 1.0
    plain = init_mask_logits(jax.random.key(1), w, prior="none")
    assert abs(float(jnp.std(plain)) - 0.01) < 1e-3
    # prior candidate vs the disjoint one: 2 shared positions * 3 * 0.01 apart on average
    gap = jnp.max(logits, -1) - jnp.min(logits, -1)
    assert abs(float(jnp.mean(gap)) - 0.06) < 0.01
    assert float(mask_entropy(logits, 100.0)) < float(mask_entropy(plain, 100.0))
    assert abs(float(mask_entropy(jnp.zeros((3, 6)), 1.0)) - math.log(6)) < 1e-6


def test_linear_schedules_hit_their_end_points():
    assert float(linear_schedule(4.0, 0.05, 0, 100)) == pytest.approx(4.0)
    assert float(linear_schedule(4.0, 0.05, 50, 100)) == pytest.approx(2.025)
    assert float(linear_schedule(4.0, 0.05, 100, 100)) == pytest.approx(0.05)
    assert float(linear_schedule(100.0, 500.0, 250, 100)) == pytest.approx(500.0)  # held


def layer(**spec_fields):
    lin = Linear(16, 8, rngs=nnx.Rngs(0))
    lin.configure({"sparsity": MaskLLM(**spec_fields).bind(10)}, seed=7)
    return lin


def stats_of(lin):
    return {k: float(v) for k, v in lin.sparsity.metric_values().items()}


def logits_of(lin):
    return lin.sparsity.params["mask_logits"][...]


def calls_of(lin):
    return int(lin.sparsity.state["step"][...])


def mask_layers(model):
    return [(p, m) for p, m in named_layers(model)
            if m.sparsity is not None and m.sparsity.spec.method == "maskllm"]


def test_layer_schedules_and_regulariser_follow_its_call_counter():
    lin = layer()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    lin(x)
    tau, kappa = (stats_of(lin)[k] for k in ("tau", "kappa"))
    assert (tau, kappa) == (pytest.approx(4.0), pytest.approx(100.0))
    # the regulariser is -lambda_0 * sum (W * M)^2 with the mask of key fold_in(seed, 0)
    soft = gumbel_nm_mask(logits_of(lin), jax.random.fold_in(jax.random.key(7), 0),
                          4.0, 100.0)
    expected = -1e-5 * float(jnp.sum((lin.kernel[...] * soft) ** 2))
    assert stats_of(lin)["regularizer"] == pytest.approx(expected, rel=1e-5)
    for _ in range(11):
        lin(x)
    stats = stats_of(lin)
    assert calls_of(lin) == 12
    assert stats["tau"] == pytest.approx(0.05) and stats["kappa"] == pytest.approx(500.0)
    assert stats["regularizer"] == 0.0  # lambda decayed to 0


def test_regulariser_moves_the_mask_and_leaves_the_weights_alone():
    # -lambda * sum (W * M)^2 with W held constant (as in the reference code): its gradient
    # reaches the logits only, so joint training does not also inflate |W|.
    lin = layer(reg_start=1.0)
    x = jax.random.normal(jax.random.key(0), (4, 16))

    def regulariser(model):
        model(x)
        return model.sparsity.metrics["regularizer"][...]

    grads = nnx.grad(regulariser)(lin)
    assert not np.any(np.asarray(grads["kernel"][...]))
    assert np.mean(np.asarray(grads["sparsity"]["params"]["mask_logits"][...]) != 0) > 0.9


def test_eval_mode_uses_the_argmax_mask_and_training_mode_samples():
    lin = layer()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    a, b = lin(x), lin(x)
    assert not np.allclose(a, b)  # a fresh Gumbel draw per training call
    lin.eval()
    step = calls_of(lin)
    hard = argmax_nm_mask(logits_of(lin))
    expected = x @ (lin.kernel[...] * hard) + lin.bias[...]
    np.testing.assert_allclose(lin(x), expected, rtol=1e-6)
    np.testing.assert_allclose(lin(x), lin(x))
    assert calls_of(lin) == step  # evaluation does not advance the schedules
    assert_valid_nm(lin.effective_kernel() != 0, 2, 4)
    again = layer()
    np.testing.assert_array_equal(again(x), a)  # same seed, same draws


@pytest.mark.parametrize("bad, key", [("mvue: true", "mvue"), ("kernel: pallas", "kernel"),
                                      ("tau_end: 0", "tau_end"), ("prior: random", "prior")])
def test_config_errors_name_the_key(tiny_gpt, bad, key):
    name, value = bad.split(": ")
    with pytest.raises(ConfigError, match=rf"'rules\.0\.sparsity\.{key}'"):
        tiny_gpt(maskllm_rule(**{name: value}))


def test_config_refuses_disagreeing_mask_only_modes(tiny_gpt):
    rules = ("rules=[{path: 'blocks/0/mlp/fc', sparsity: {method: maskllm}}, "
             "{path: 'blocks/1/mlp/fc', sparsity: {method: maskllm, freeze_weights: true}}]")
    with pytest.raises(ConfigError, match=r"'rules\.1\.sparsity\.freeze_weights'"):
        tiny_gpt(rules)


def test_optimizer_gives_logits_their_learning_rate_and_no_weight_decay():
    lin = layer()
    params = nnx.state(lin, nnx.Param)
    cfg = OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
    lin.configure({"sparsity": MaskLLM(mask_lr_mult=10.0).bind(10)}, seed=7)
    tx, _ = make_optimizer(cfg, 100, *param_labels(lin))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr * sign(g); AdamW adds -lr * wd * w on matrices.
    np.testing.assert_allclose(updates["sparsity"]["params"]["mask_logits"][...], -0.1,
                               rtol=1e-4)
    np.testing.assert_allclose(updates["kernel"][...],
                               -1e-2 * (1 + 0.5 * params["kernel"][...]), rtol=1e-4)
    lin.configure({"sparsity": MaskLLM(freeze_weights=True).bind(10)}, seed=7)
    frozen, _ = make_optimizer(cfg, 100, *param_labels(lin))
    updates, _ = frozen.update(grads, frozen.init(params), params)
    assert not np.any(updates["kernel"][...]) and not np.any(updates["bias"][...])
    np.testing.assert_allclose(updates["sparsity"]["params"]["mask_logits"][...], -1e-2,
                               rtol=1e-4)


@pytest.mark.slow
def test_mask_only_run_from_a_dense_checkpoint(tiny_gpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tiny_gpt(run_dir=tmp_path / "dense"), verbose=False)
    dense, _, _ = load_model(tmp_path / "dense")
    cfg = tiny_gpt(maskllm_rule(freeze_weights="true", mask_lr_mult=10),
                   f"train.init_from={tmp_path / 'dense'}", "train.steps=20",
                   run_dir=tmp_path / "mask")
    initial = init_model(cfg)
    results = run(cfg, verbose=False)
    assert np.isfinite(results["val_loss"])
    model, _, _ = load_model(tmp_path / "mask")
    dense_params = dict(named_layers(dense))
    for path, lin in named_layers(model):  # every weight kept its dense value
        np.testing.assert_array_equal(lin.kernel[...], dense_params[path].kernel[...])
    layers = mask_layers(model)
    assert len(layers) == 4
    start = dict(mask_layers(initial))
    for path, lin in layers:
        assert_valid_nm(lin.effective_kernel() != 0, 2, 4)
        assert not np.array_equal(logits_of(lin), logits_of(start[path]))
        assert calls_of(lin) == 20
        # the prior biased the initial argmax to the magnitude mask of the dense weight
        agree = np.mean(np.asarray(argmax_nm_mask(logits_of(start[path])))
                        == np.asarray(nm_mask(dense_params[path].kernel[...])))
        assert agree > 0.95
    acc = EventAccumulator(str(tmp_path / "mask"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for name in (*MASK_STAT_NAMES, "flip_rate", "sparsity", "mask_changed"):
        assert f"sparsity/blocks/0/mlp/fc/{name}" in tags, name
    assert "train/regularizer" in tags
    assert [e.value for e in acc.Scalars("sparsity/sparsity")] == [0.5] * 4
    # interval means of tau_t = 4 - 3.95 t / 20 over calls 0-4, ..., 15-19
    tau = [e.value for e in acc.Scalars("sparsity/blocks/0/mlp/fc/tau")]
    np.testing.assert_allclose(tau, [4 - 3.95 * (5 * i + 2) / 20 for i in range(4)], rtol=1e-5)


def test_init_from_rejects_a_checkpoint_of_another_shape(tiny_gpt, tmp_path):
    run(tiny_gpt("train.steps=10", run_dir=tmp_path / "dense"), verbose=False)
    cfg = tiny_gpt("model.n_embd=64", f"train.init_from={tmp_path / 'dense'}",
                   run_dir=tmp_path / "other")
    with pytest.raises(ConfigError, match=r"train.init_from .*dense: parameter "
                                          r"blocks/0/attn/proj/bias has shape \(32,\), "
                                          r"this model \(64,\)$"):
        run(cfg, verbose=False)
    assert not (tmp_path / "other").exists()


def test_packed_layer_multiplies_by_the_learned_argmax_mask():
    lin = layer()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    for _ in range(3):  # training calls advance the counter; packing keeps the argmax mask
        lin(x)
    lin.eval()
    expected = lin(x)
    lin.pack()
    assert lin.sparsity is None and lin.packed is not None
    np.testing.assert_allclose(lin(x), expected, rtol=1e-6, atol=1e-6)
