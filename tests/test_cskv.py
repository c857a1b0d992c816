"""CSKV (``attention: {method: cskv}``): ASVD initialisation, the bi-branch attention and
its window boundary, KIVI quantisation, cached decoding against teacher-forced
evaluation, cache bytes, and training only the new projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.adapt import calibrate_attention, uncalibrated_attention
from sparsejax.config import ConfigError, load_config
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from sparsejax.transforms import Context, Site, build_spec
from sparsejax.transforms.attention.cskv import (
    asvd_factors,
    cache_bytes_per_old_token,
    pack_codes,
    quantize_per_channel_groups,
    quantize_per_token,
    unpack_codes,
)
from tests.conftest import REPO
from tests.helpers.decoding import cached_logits


def cskv_rule(**fields) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in {"method": "cskv", "window": 8,
                                               **fields}.items())
    return f"rules=[{{path: 'blocks/\\d+/attn', attention: {{{body}}}}}]"


def test_asvd_equals_the_truncated_svd_formula_and_is_exact_at_full_rank():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 16))
    s = rng.uniform(0.1, 3.0, size=24)
    for rank in (4, 16):
        a, b = (np.asarray(t, np.float64) for t in asvd_factors(w, s, rank, alpha=0.5))
        scale = s ** 0.5
        u, sig, vt = np.linalg.svd(scale[:, None] * w, full_matrices=False)
        ref_a = (u[:, :rank] * np.sqrt(sig[:rank])) / scale[:, None]
        ref_b = np.sqrt(sig[:rank])[:, None] * vt[:rank]
        flip = np.sign(np.sum(a * ref_a, axis=0))  # singular vectors are defined up to sign
        np.testing.assert_allclose(a * flip, ref_a, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b * flip[:, None], ref_b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a @ b, ref_a @ ref_b, rtol=1e-4, atol=1e-5)
    a, b = asvd_factors(w, s, 16)
    np.testing.assert_allclose(np.asarray(a @ b), w, atol=1e-4)


def test_kivi_quantisers_use_their_levels_per_channel_group_and_per_token():
    c = jax.random.normal(jax.random.key(0), (2, 8, 6)) * jnp.arange(1.0, 7.0)
    codes, scale, zero = quantize_per_channel_groups(c, 4, 4)
    assert scale.shape == (2, 2, 6) and codes.min() >= 0 and codes.max() <= 15
    value = codes * jnp.repeat(scale, 4, 1) + jnp.repeat(zero, 4, 1)
    assert float(jnp.max(jnp.abs(value - c) / jnp.repeat(scale, 4, 1))) <= 0.5 + 1e-2
    codes, scale, zero = quantize_per_token(c, 4)
    assert scale.shape == (2, 8, 1)
    assert float(jnp.max(jnp.abs(codes * scale + zero - c) / scale)) <= 0.5 + 1e-2


def attend(spec, q, k, v, x, params, state, training=False):
    site = Site("attention", q.shape[2:])
    return spec.attend(q, k, v, jnp.arange(q.shape[1]), params, state, site,
                       Context(training, jax.random.key(0)), x=x)[0]


def test_window_boundary_on_a_hand_built_case():
    """One head, one feature, window 2, zero queries (uniform weights), and a compressed
    branch that reconstructs every key and value as 0: token i averages the exact values
    of tokens i-1 and i and a 0 for each older token."""
    spec = build_spec("attention", {"method": "cskv", "window": 2, "k_density": 1.0,
                                    "v_density": 1.0})
    params = {"a_k": jnp.ones((1, 1)), "b_k": jnp.zeros((1, 1)),
              "a_v": jnp.ones((1, 1)), "b_v": jnp.zeros((1, 1))}
    state = {"bias_k": jnp.zeros(1), "bias_v": jnp.zeros(1), "calibrated": jnp.int32(1)}
    v = jnp.array([1.0, 2.0, 4.0, 8.0]).reshape(1, 4, 1, 1)
    q = jnp.zeros_like(v)
    y = attend(spec, q, v, v, jnp.ones((1, 4, 1)), params, state)
    np.testing.assert_allclose(np.asarray(y).ravel(), [1.0, 1.5, 6 / 3, 12 / 4], rtol=1e-6)


def full_rank_calibrated(tiny_gpt, **fields):
    cfg = tiny_gpt(cskv_rule(k_density=1.0, v_density=1.0, calib_batches=2, **fields))
    teacher, student = init_model(tiny_gpt()), init_model(cfg)
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (4, 32), 0, 255))
               for i in range(2)]
    # CSKV's factors come from the student's own (init_from) projections: no teacher pass,
    # so a missing teacher is never touched, and there is no output statistic to report
    assert calibrate_attention(student, None, batches) == []
    return teacher, student, batches


def test_bibranch_equals_plain_attention_at_full_rank_without_quantisation(tiny_gpt):
    teacher, student, batches = full_rank_calibrated(tiny_gpt)
    assert uncalibrated_attention(student) == []
    teacher.eval()
    student.eval()
    np.testing.assert_allclose(np.asarray(student(batches[0])),
                               np.asarray(teacher(batches[0])), atol=5e-5)
    # and the biases are the qkv layer's
    _, b_k, _, b_v = teacher.blocks[0].attn.kv_projection()
    slot = student.blocks[0].attn.attention
    np.testing.assert_array_equal(np.asarray(slot.state["bias_k"][...]), np.asarray(b_k))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_into_whole_bytes_and_unpack_exactly(bits):
    codes = jax.random.randint(jax.random.key(bits), (3, 5, 13), 0, 2 ** bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, -(-13 * bits // 8))
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, 13)),
                                  np.asarray(codes, np.float32))
    if bits == 2:  # the layout: code i of a byte in bits [2i, 2i + 2)
        byte = pack_codes(jnp.array([[1, 2, 3, 0]]), 2)
        assert int(byte[0, 0]) == 1 + (2 << 2) + (3 << 4)


@pytest.mark.parametrize("bits", [pytest.param(0, marks=pytest.mark.slow), 2, 4])
def test_cached_decoding_equals_teacher_forced_bibranch_evaluation(tiny_gpt, bits):
    model = init_model(tiny_gpt(cskv_rule(quant_bits=bits, group=4, k_density=0.5,
                                          v_density=0.5)))
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (2, 30), 0, 255)
    full = model(ids)
    np.testing.assert_allclose(np.asarray(cached_logits(model, ids, 11)), np.asarray(full),
                               atol=1e-5)
    # compressed vs exact: the windowless plain model differs
    plain = init_model(tiny_gpt())
    plain.eval()
    assert not np.allclose(np.asarray(plain(ids)), np.asarray(full), atol=1e-3)


def test_cache_bytes_are_counted_from_the_arrays(tiny_gpt):
    """n_embd 32, block 32, float32: the full cache stores 2 * 32 * 4 = 256 bytes per
    token; at density 0.5 the compressed branch stores 128; with 4-bit codes 2 * 16 / 2 =
    16 bytes of codes (2-bit: 8) plus float16 scales (keys: 2 * 16 * 2 bytes per group of
    4, values: 2 * 2 bytes per token) over the padded length (32 + 2 groups of slack = 40
    of 32)."""
    scales = 2 * 16 * 2 / 4 + 4
    for bits, expected in [(0, 128.0), (4, (16 + scales) * 40 / 32),
                           (2, (8 + scales) * 40 / 32)]:
        model = init_model(tiny_gpt(cskv_rule(quant_bits=bits, group=4, k_density=0.5,
                                              v_density=0.5)))
        cache = model.init_cache(3)
        assert cache_bytes_per_old_token(cache[0], 32) == pytest.approx(expected)
    full = init_model(tiny_gpt()).init_cache(3)[0]
    assert sum(a.nbytes for a in full.values()) / 3 / 32 == 256


def test_a_group_longer_than_the_window_or_a_run_without_init_from_is_refused(tiny_gpt):
    with pytest.raises(ConfigError, match=r"rules\.0\.attention\.group"):
        tiny_gpt(cskv_rule(quant_bits=4, group=16))
    with pytest.raises(ConfigError, match="cskv.*blocks/0/attn.*train.init_from"):
        run(tiny_gpt(cskv_rule()), verbose=False)


@pytest.mark.slow
def test_training_calibrates_then_changes_only_the_projections(tiny_gpt, tmp_path):
    run(tiny_gpt("train.steps=10", run_dir=tmp_path / "base"), verbose=False)
    cfg = tiny_gpt(cskv_rule(calib_batches=2), "train.steps=8",
                   f"train.init_from={tmp_path / 'base'}", run_dir=tmp_path / "cskv")
    run(cfg, verbose=False)
    base, _, _ = load_model(tmp_path / "base")
    tuned, _, _ = load_model(tmp_path / "cskv")
    np.testing.assert_array_equal(np.asarray(tuned.blocks[0].attn.qkv.kernel[...]),
                                  np.asarray(base.blocks[0].attn.qkv.kernel[...]))
    slot = tuned.blocks[0].attn.attention
    assert int(slot.state["calibrated"][...]) == 1
    fresh = init_model(cfg)
    calibrate_attention(fresh, base, [np.asarray(jax.random.randint(jax.random.key(0),
                                                                    (8, 32), 0, 255))])
    assert not np.allclose(np.asarray(slot.params["a_k"][...]),
                           np.asarray(fresh.blocks[0].attn.attention.params["a_k"][...]))


def test_the_cskv_config_builds_and_lists_its_attention_modules():
    cfg = load_config(REPO / "configs/gpt_cskv.yaml", ["model.n_layer=1"])
    model = init_model(cfg)
    slot = model.blocks[0].attn.attention
    assert slot.spec.method == "cskv" and slot.params["a_k"][...].shape == (128, 64)
    assert slot.params["a_v"][...].shape == (128, 64)
