"""The Llama family: rotary embeddings against the complex-number rotation they define,
llama3 frequency scaling against its three regimes, grouped-query attention against an
explicit NumPy softmax over repeated heads, KV-cached decoding against the full forward
with the cache holding only the key / value heads, and the config's refusals."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import ConfigError, load_config
from sparsejax.models import Llama
from sparsejax.nn.rotary import Rotary, apply_rotary, rotary_frequencies
from sparsejax.train import run
from tests.conftest import REPO, TINY_GPT


def small_llama(n_kv_head: int | None = None, **kw) -> Llama:
    return Llama(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                 n_embd=32, rngs=nnx.Rngs(params=0), **kw)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rotary_rotates_each_half_pair_by_position_times_frequency(theta):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    positions = np.array([0, 1, 2, 5, 9, 30, 100])
    got = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(positions), Rotary(16, theta)))
    # the pair (x_j, x_{j+8}) as a complex number, multiplied by exp(i p theta^(-2j/16))
    z = x[..., :8] + 1j * x[..., 8:]
    freq = theta ** (-np.arange(0, 16, 2) / 16)
    z = z * np.exp(1j * positions[None, :, None, None] * freq)
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-4,
                               atol=1e-4)


def test_rotary_scores_depend_only_on_the_relative_position():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32) for _ in range(2))
    rotary = Rotary(8)

    def score(i, j):
        return float(jnp.sum(apply_rotary(q, jnp.array([i]), rotary)
                             * apply_rotary(k, jnp.array([j]), rotary)))

    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-4, abs=1e-5)


def test_llama3_scaling_keeps_high_divides_low_and_interpolates_between():
    base = rotary_frequencies(Rotary(128, 500000.0))
    scaled = rotary_frequencies(Rotary(128, 500000.0, scaling="llama3", factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_context=8192))
    wavelen = 2 * math.pi / base
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0)
    middle = ~high & ~low
    assert np.all(scaled[middle] <= base[middle]) and np.all(scaled[middle] >= base[middle] / 8)
    assert np.all(np.diff(scaled) < 0)  # still strictly decreasing with the index


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_attention_equals_softmax_over_repeated_heads(n_kv_head):
    model = small_llama(n_kv_head)
    attn = model.layers[0].attn
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32)
    q, k, v = (np.asarray(a) for a in attn._heads(x, jnp.arange(6)))
    assert k.shape == (2, 6, n_kv_head, 8)
    group = 4 // n_kv_head
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bshd->bthd", weights, v)
    got = attn.attend(*attn._heads(x, jnp.arange(6)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [1, 2])
@pytest.mark.parametrize("tie", [True, False])
def test_cached_decoding_equals_the_full_forward_and_caches_only_kv_heads(n_kv_head, tie):
    model = small_llama(n_kv_head, tie_embeddings=tie, qkv_bias=not tie)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 12)), jnp.int32)
    full = model(ids)
    cache = model.init_cache(2)
    assert cache[0]["k"].shape == (2, 32, n_kv_head, 8)
    prefill, cache = model.forward_cached(ids[:, :5], cache, jnp.int32(0))
    steps = [prefill]
    for t in range(5, 12):
        logits, cache = model.forward_cached(ids[:, t:t + 1], cache, jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override, key", [
    ("model.n_kv_head=3", "model.n_kv_head"),
    ("model.rope_scaling=yarn", "model.rope_scaling"),
    ("model.n_embd=36", "model.n_embd"),  # head dimension 9: odd
    ("model.rope_theta=0", "model.rope_theta"),
])
def test_bad_llama_settings_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(REPO / "configs/llama_tiny.yaml", [override])


def test_llama_tiny_trains_and_matches_gpt_tiny_in_parameters(tmp_path):
    llama = load_config(REPO / "configs/llama_tiny.yaml")
    gpt = load_config(REPO / "configs/gpt_tiny.yaml")
    count = lambda cfg: sum(int(np.size(a)) for a in jax.tree.leaves(  # noqa: E731
        nnx.state(nnx.eval_shape(lambda: Llama(vocab_size=cfg.model.vocab_size,
                                               n_layer=cfg.model.n_layer,
                                               n_kv_head=cfg.model.n_kv_head,
                                               n_embd=cfg.model.n_embd,
                                               rngs=nnx.Rngs(params=0))), nnx.Param)))
    assert llama.model.kind == "llama" and gpt.model.kind == "gpt"
    assert abs(count(llama) / 0.84e6 - 1) < 0.1
    results = run(load_config(REPO / "configs/llama_tiny.yaml",
                              [*TINY_GPT, "train.steps=20", f"run_dir={tmp_path / 'run'}"]),
                  verbose=False)
    assert results["val_loss"] < math.log(256)  # learned something from 5.55 nats
