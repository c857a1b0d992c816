"""Gain-cell attention (``sparsejax.transforms.attention.gaincell``): converter levels,
the bounded score non-linearity, leakage and window, causality, tile clipping, the cell
models, and the adaptation from a softmax teacher (``sparsejax.adapt``)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.adapt import calibrate_attention, output_statistics, uncalibrated_attention
from sparsejax.config import ConfigError, load_config
from sparsejax.nn import Attention, Linear, named_layers, transform_slots
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from sparsejax.transforms import build_spec
from sparsejax.transforms.attention.gaincell import (
    CELL_POLYNOMIAL,
    K_RANGE,
    OUT_RANGE,
    Q_RANGE,
    add_read_noise,
    decay_window,
    gaincell_readout,
    gaincell_scores,
    head_statistics,
    quantize_levels,
)
from tests.conftest import REPO
from tests.helpers.decoding import cached_logits

ATTN_RULE = "rules=[{path: 'blocks/\\d+/attn', attention: {window: 8, array: 8, " \
            "calib_batches: 2}}]"
DEFAULTS = dict(window=1024, decay_rate=1.6e-4, array=64, q_levels=16, kv_levels=8,
                out_levels=32, gain=19.3, score_saturation=80.0, output_saturation=40.0)


def head_params(heads: int, **values: float) -> dict[str, jax.Array]:
    base = {"a_q": 1.0, "b_q": 0.0, "a_k": 1.0, "b_k": 0.45, "a_v": 1.0, "b_v": 0.45,
            "a_o": 1.0, "b_o": 0.0, **values}
    return {k: jnp.full((heads,), v, jnp.float32) for k, v in base.items()}


def random_qkv(seed: int = 0, b: int = 2, t: int = 24, h: int = 2, d: int = 8, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(scale * jax.random.normal(k, (b, t, h, d)) for k in keys)


# --------------------------------------------------------------------------- converters


@pytest.mark.parametrize(("bounds", "levels"), [(Q_RANGE, 16), (K_RANGE, 8), (OUT_RANGE, 32)],
                         ids=["q", "kv", "out"])
def test_converters_have_exactly_their_number_of_levels(bounds, levels):
    x = jnp.linspace(*bounds, 10_001)
    values = np.unique(np.asarray(quantize_levels(x, *bounds, levels)))
    assert len(values) == levels
    np.testing.assert_allclose(values[[0, -1]], bounds, atol=1e-6)
    np.testing.assert_allclose(np.diff(values), (bounds[1] - bounds[0]) / (levels - 1),
                               rtol=1e-4)


def test_quantiser_gradient_is_straight_through():
    grad = jax.grad(lambda x: jnp.sum(quantize_levels(x, 0.0, 1.0, 16) * jnp.arange(5.0)))
    np.testing.assert_array_equal(grad(jnp.linspace(0.03, 0.97, 5)), np.arange(5.0))


def test_queries_keys_values_and_tile_outputs_take_at_most_their_levels():
    """Inside the attention: with one tile, each read-out value lies on the 32-level grid
    and, driven to both ends, all 16 / 8 levels of the inputs are used."""
    q, k, v = random_qkv(1, b=4, t=16, scale=3.0)
    from sparsejax.transforms.attention.gaincell import _inputs

    qt, sk, sv = _inputs(q, k, v, head_params(2, b_q=0.5, b_k=0.45, b_v=0.45), 16, 8)
    assert len(np.unique(np.asarray(qt))) == 16
    assert len(np.unique(np.asarray(sk))) == len(np.unique(np.asarray(sv))) == 8
    out, _ = gaincell_readout(q, k, v, jnp.arange(16), head_params(2, b_q=0.5),
                              **{**DEFAULTS, "array": 16, "output_saturation": 0.5})
    grid = np.linspace(-1.0, 1.0, 32)
    distance = np.min(np.abs(np.asarray(out).reshape(-1, 1) - grid[None]), axis=1)
    assert distance.max() < 1e-5
    assert 2 < len(np.unique(np.round(np.asarray(out), 5))) <= 32


# --------------------------------------------------------------------------- scores, decay


def test_decay_is_delta_to_the_lag_inside_the_window_and_zero_outside():
    rate, window = 0.3, 5
    got = np.asarray(decay_window(jnp.arange(3, 12), 14, window, rate))
    expected = np.zeros((9, 14))
    for row, i in enumerate(range(3, 12)):
        for j in range(14):
            if i - window < j <= i:
                expected[row, j] = np.exp(-rate) ** (i - j)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_scores_are_bounded_in_zero_one_and_zero_outside_the_window():
    q, k, _ = random_qkv(2, t=32, scale=5.0)
    decay = decay_window(jnp.arange(32), 32, 6, 0.05)
    qt = jnp.clip(q, 0, 1)
    scores = np.asarray(gaincell_scores(qt, jnp.clip(k, -0.45, 0.45), decay, gain=19.3,
                                        score_saturation=1.0))
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert (scores == 1.0).any() and (scores == 0.0).any()  # both bounds reached
    hidden = np.asarray(decay) == 0
    assert np.all(scores[:, :, hidden] == 0.0)


def test_output_at_a_position_is_independent_of_later_tokens():
    q, k, v = random_qkv(3, t=20)
    params = head_params(2, b_q=0.5)
    settings = {**DEFAULTS, "window": 7, "array": 4, "decay_rate": 0.1}
    out, _ = gaincell_readout(q, k, v, jnp.arange(20), params, **settings)
    cut = 11
    k2 = k.at[:, cut + 1:].set(5.0)
    v2 = v.at[:, cut + 1:].set(-5.0)
    q2 = q.at[:, cut + 1:].set(3.0)
    out2, _ = gaincell_readout(q2, k2, v2, jnp.arange(20), params, **settings)
    np.testing.assert_array_equal(np.asarray(out)[:, :cut + 1], np.asarray(out2)[:, :cut + 1])
    assert not np.allclose(np.asarray(out)[:, cut + 1:], np.asarray(out2)[:, cut + 1:])


def test_each_tile_is_clipped_to_its_converter_range_before_the_sum():
    """Hand-built: one head, one feature, tiles of 2 tokens, no leakage. Every visible
    key scores A = 1 (q~ = 1, k~ - 0.45 = 0.45, g / S_sat = 1 / 0.45), and each key adds
    v~ - 0.45 = +-0.45 over S_av = 0.3, i.e. +-1.5, to its tile."""
    q = jnp.ones((1, 4, 1, 1))
    k = jnp.full((1, 4, 1, 1), 0.9)
    v = jnp.array([0.9, 0.9, 0.9, 0.0]).reshape(1, 4, 1, 1)  # +1.5, +1.5 | +1.5, -1.5
    params = head_params(1, b_k=0.0, b_v=0.0)
    out, metrics = gaincell_readout(q, k, v, jnp.arange(4), params, window=16, decay_rate=0.0,
                                    array=2, q_levels=16, kv_levels=8, out_levels=32,
                                    gain=1.0, score_saturation=0.45, output_saturation=0.3)
    zero_level = -1.0 + 2.0 / 31 * 16  # 0 is no level of 32 on [-1, 1]: it reads 1/31
    # token 0: tile 0 = 1.5 -> 1 (tile 1 holds no visible key: not read); token 1: 3 -> 1;
    # token 2: 1 + (1.5 -> 1); token 3: 1 + (1.5 - 1.5 -> 1/31)
    np.testing.assert_allclose(np.asarray(out).ravel(), [1.0, 1.0, 2.0, 1.0 + zero_level],
                               rtol=1e-6)
    assert float(metrics["output_clipped"]) > 0  # without clipping token 1 would read 3


# --------------------------------------------------------------------------- cell models


def test_nonlinear_cell_takes_the_polynomial_value_and_the_linear_gradient():
    q, k, v = random_qkv(4, t=12)
    params = head_params(2, b_q=0.5)
    settings = {**DEFAULTS, "array": 4, "decay_rate": 0.2, "score_saturation": 8.0,
                "output_saturation": 4.0}
    decay = decay_window(jnp.arange(12), 12, 16, 0.2)
    from sparsejax.transforms.attention.gaincell import _inputs

    qt, sk, _ = _inputs(q, k, v, params, 16, 8)
    poly = sum(c * jnp.einsum("bthd,bjhd,tj->bhtj", qt, sk ** p,
                              decay ** p if p else (decay > 0).astype(jnp.float32))
               for p, c in enumerate(CELL_POLYNOMIAL))
    got = gaincell_scores(qt, sk, decay, gain=19.3, score_saturation=1.0, cell="nonlinear")
    np.testing.assert_allclose(np.asarray(got), np.clip(np.asarray(poly), 0, 1), atol=1e-5)

    def loss(q, cell):
        return jnp.sum(gaincell_readout(q, k, v, jnp.arange(12), params, **settings,
                                        cell=cell)[0] * jnp.arange(8.0))

    assert not np.allclose(loss(q, "linear"), loss(q, "nonlinear"))
    # the surrogate: the gradient flows through the linear fit wherever the forward of
    # the two cell models clips and quantises alike
    g_lin, g_nl = jax.grad(loss)(q, "linear"), jax.grad(loss)(q, "nonlinear")
    assert np.all(np.isfinite(np.asarray(g_nl))) and np.abs(np.asarray(g_nl)).sum() > 0
    assert np.corrcoef(np.asarray(g_lin).ravel(), np.asarray(g_nl).ravel())[0, 1] > 0.5


def test_cell_polynomial_is_the_reference_fit_summed_over_input_powers():
    c = (0.17393044, 0.15653739, 0.14088365, 0.12679529, 5.51975209, 4.96777688,
         4.4709992, -1.44776001, -1.30298401, 46.05483778)
    expected = [c[0] + c[1] * .9 + c[2] * .81 + c[3] * .729, c[4] + c[5] * .9 + c[6] * .81,
                c[7] + c[8] * .9, c[9]]
    np.testing.assert_allclose(CELL_POLYNOMIAL, expected, rtol=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.01])
def test_read_noise_has_the_requested_energy_on_the_read_entries_only(ratio):
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    where = jnp.arange(7) < jnp.arange(1, 6)[:, None]  # (5, 7): row i reads i + 1 entries
    y = add_read_noise(x, where, ratio, jax.random.key(1))
    noise = np.asarray(y - x)
    np.testing.assert_allclose((noise ** 2).sum(-1), ratio * (np.asarray(x) ** 2).sum(-1),
                               rtol=1e-4)
    assert np.all(noise[:, ~np.asarray(where)] == 0)
    weights = jnp.arange(105.0).reshape(3, 5, 7)
    grad = jax.grad(lambda x: jnp.sum(add_read_noise(x, where, ratio, jax.random.key(1))
                                      * weights))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(weights))  # noise: no grad


# --------------------------------------------------------------------------- in a GPT


def test_rules_place_gaincell_on_attention_modules_only(tiny_gpt):
    model = init_model(tiny_gpt(ATTN_RULE))
    slots = [(p, stage) for p, _, stage, _ in transform_slots(model)]
    assert slots == [("blocks/0/attn", "attention"), ("blocks/1/attn", "attention")]
    assert all(layer.slots() == [] for _, layer in named_layers(model, (Linear,)))
    broad = init_model(tiny_gpt("rules=[{path: 'blocks/.*', sparsity: {method: ste}}]"))
    assert all(layer.attention is None for _, layer in named_layers(broad, (Attention,)))


def test_a_bad_field_or_path_is_refused_naming_it(tiny_gpt):
    with pytest.raises(ConfigError, match=r"rules\.0\.attention\.window"):
        tiny_gpt("rules=[{path: 'blocks/\\d+/attn', attention: {window: 0}}]")
    with pytest.raises(ConfigError, match=r"blocks/0/attn"):
        init_model(tiny_gpt("rules=[{path: 'blocks/\\d+/atn', attention: {}}]"))


@pytest.mark.slow
def test_gradients_through_a_gaincell_gpt_are_finite_and_reach_the_affines(tiny_gpt):
    model = init_model(tiny_gpt(ATTN_RULE))
    x = jax.random.randint(jax.random.key(0), (2, 32), 0, 255)

    def loss(model):
        logits = model(x[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    slot = grads.blocks[0].attn.attention
    assert any(np.abs(np.asarray(slot.params[n][...])).sum() > 0 for n in ("a_q", "b_q"))
    assert np.abs(np.asarray(slot.params["a_o"][...])).sum() > 0


def test_read_noise_is_on_in_evaluation_and_in_training_only_when_asked(tiny_gpt):
    ids = jax.random.randint(jax.random.key(1), (2, 20), 0, 255)
    noisy_rule = ATTN_RULE.replace("calib_batches: 2", "calib_batches: 2, read_noise: 0.1")
    clean, noisy = init_model(tiny_gpt(ATTN_RULE)), init_model(tiny_gpt(noisy_rule))
    for model in (clean, noisy):
        model.eval()
    assert not np.allclose(np.asarray(noisy(ids)), np.asarray(clean(ids)), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(noisy(ids)), np.asarray(noisy(ids)))
    clean.train()
    noisy.train()  # evaluation-only noise, as the reference: training reads are exact
    np.testing.assert_array_equal(np.asarray(noisy(ids)), np.asarray(clean(ids)))
    assert int(noisy.blocks[0].attn.attention.state["count"][...]) == 0

    aware = init_model(tiny_gpt(noisy_rule.replace("read_noise: 0.1",
                                                   "read_noise: 0.1, read_noise_train: true")))
    aware.train()
    first, second = np.asarray(aware(ids)), np.asarray(aware(ids))
    assert not np.allclose(first, np.asarray(clean(ids)), atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)  # a fresh draw per training call
    assert int(aware.blocks[0].attn.attention.state["count"][...]) == 2
    with pytest.raises(ConfigError, match=r"rules\.0\.attention\.read_noise_train"):
        tiny_gpt(ATTN_RULE.replace("calib_batches: 2", "read_noise_train: true"))


def test_each_decoding_step_draws_its_own_read_noise():
    """One query at position 5 or 6 over the same six keys (no leakage, a wide window):
    noiseless reads are equal, so the noisy ones differ only through their draws."""
    from sparsejax.transforms import Context, Site

    spec = build_spec("attention", {"method": "gaincell", "decay_rate": 0.0,
                                    "read_noise": 0.1})
    site = Site("attention", (2, 8))
    q, k, v = random_qkv(3, b=1, t=6)
    params = head_params(2, b_q=0.5)
    state = {"calibrated": jnp.int32(1), "count": jnp.int32(0)}
    ctx = Context(False, jax.random.key(0))

    def read(position, spec):
        return np.asarray(spec.attend(q[:, :1], k, v, jnp.array([position]), params, state,
                                      site, ctx)[0])

    clean = build_spec("attention", {"method": "gaincell", "decay_rate": 0.0})
    np.testing.assert_array_equal(read(5, clean), read(6, clean))
    assert not np.allclose(read(5, spec), read(6, spec), atol=1e-4)


def test_cached_decoding_equals_the_full_forward(tiny_gpt):
    model = init_model(tiny_gpt(ATTN_RULE.replace("window: 8", "window: 5")))
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (2, 20), 0, 255)
    np.testing.assert_allclose(np.asarray(cached_logits(model, ids, 7)),
                               np.asarray(model(ids)), atol=2e-5)


def test_calibration_matches_the_teachers_output_statistics(tiny_gpt):
    cfg = tiny_gpt(ATTN_RULE)
    teacher = init_model(tiny_gpt())
    student = init_model(cfg)  # same seed: the teacher's weights, gain-cell attention
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (4, 32), 0, 255))
               for i in range(2)]
    assert uncalibrated_attention(student) == ["blocks/0/attn", "blocks/1/attn"]
    reports = calibrate_attention(student, teacher, batches)
    assert [r.path for r in reports] == ["blocks/0/attn", "blocks/1/attn"]
    target = output_statistics(teacher, batches)
    got = output_statistics(student, batches)
    for path, (mean, std) in target.items():  # stated tolerance: 1e-3 of the teacher's std
        np.testing.assert_allclose(got[path][0], mean, atol=1e-3 * std.max())
        np.testing.assert_allclose(got[path][1], std, rtol=1e-3)
    assert uncalibrated_attention(student) == []
    # the inputs: mean at the centre of the range, calib_sigmas (2) std at its edge
    slot = student.blocks[0].attn.attention
    x = student.wte(batches[0]) + student.wpe(jnp.arange(32))
    q, k, _ = student.blocks[0].attn._heads(student.blocks[0].ln_1(x))
    p = {n: slot.params[n][...][:, None] for n in ("a_q", "b_q", "a_k", "b_k")}
    batches_x = [student.wte(b) + student.wpe(jnp.arange(32)) for b in batches]
    qs, ks = zip(*[student.blocks[0].attn._heads(student.blocks[0].ln_1(b))[:2]
                   for b in batches_x], strict=True)
    q_mean, q_std = head_statistics(p["a_q"] * jnp.concatenate(qs) + p["b_q"])
    k_mean, k_std = head_statistics(p["a_k"] * jnp.concatenate(ks) + p["b_k"])
    np.testing.assert_allclose(q_mean, 0.5, atol=1e-4)
    np.testing.assert_allclose(q_std, 0.25, rtol=1e-4)
    np.testing.assert_allclose(k_mean, 0.45, atol=1e-4)
    np.testing.assert_allclose(k_std, 0.225, rtol=1e-4)
    del q, k


@pytest.mark.slow
def test_training_from_a_softmax_run_calibrates_and_a_later_run_carries_the_affines(tiny_gpt,
                                                                             tmp_path):
    run(tiny_gpt("train.steps=10", run_dir=tmp_path / "teacher"), verbose=False)
    cfg = tiny_gpt(ATTN_RULE, "train.steps=6", f"train.init_from={tmp_path / 'teacher'}",
                   run_dir=tmp_path / "gc")
    first = run(cfg, verbose=False)
    assert np.isfinite(first["val_loss"])
    model, _, _ = load_model(tmp_path / "gc")
    slot = model.blocks[0].attn.attention
    assert int(slot.state["calibrated"][...]) == 1
    assert not np.allclose(np.asarray(slot.params["a_q"][...]), 1.0)  # set from statistics
    # a run initialised from the gain-cell run carries its affines instead of recalibrating
    again = tiny_gpt(ATTN_RULE, "train.steps=2", f"train.init_from={tmp_path / 'gc'}",
                     run_dir=tmp_path / "gc2")
    carried = init_model(again)
    np.testing.assert_array_equal(np.asarray(carried.blocks[0].attn.attention.params["a_q"][...]),
                                  np.asarray(slot.params["a_q"][...]))
    assert uncalibrated_attention(carried) == []


def test_layers_command_lists_attention_modules():
    out = subprocess.run([sys.executable, "-m", "sparsejax", "layers",
                          str(REPO / "configs/gpt_gaincell.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert "blocks/0/attn\tattention 4x32\tattention:gaincell(window=64)" in out
    assert "blocks/0/attn/qkv" in out


def test_spec_defaults_are_the_reference_constants():
    spec = build_spec("attention", {})
    assert (spec.method, spec.q_levels, spec.kv_levels, spec.out_levels, spec.array) == (
        "gaincell", 16, 8, 32, 64)
    assert (spec.gain, spec.score_saturation, spec.output_saturation) == (19.3, 80.0, 40.0)
    cfg = load_config(REPO / "configs/gpt_gaincell.yaml", [])
    assert cfg.rules[0].attention["window"] == 64
