"""GPT and MLP behave as specified; rules find layers by path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import RuleConfig
from sparsejax.models import GPT, MLPClassifier
from sparsejax.nn import Linear, assign_rules, dropout, named_layers


def small_gpt(**kw) -> GPT:
    args = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(**{**args, **kw}, rngs=nnx.Rngs(params=0))


def test_gpt_is_causal():
    model = small_gpt()
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    changed = ids.at[:, 10:].set((ids[:, 10:] + 1) % 256)
    a, b = model(ids), model(changed)
    assert a.shape == (2, 16, 256) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_weight_tying_removes_the_head():
    tied, untied = small_gpt(), small_gpt(tie_embeddings=False)
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(untied) - count(tied) == 32 * 256
    assert "lm_head" in dict(named_layers(untied)) and "lm_head" not in dict(named_layers(tied))


def test_gpt_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        small_gpt()(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compute_dtype_keeps_float32_params_and_logits(dtype):
    model = small_gpt(dtype=dtype)
    ids = jnp.arange(16)[None] % 256
    assert model(ids).dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ref = small_gpt()(ids)
    tol = 1e-5 if dtype == jnp.float32 else 0.1
    np.testing.assert_allclose(model(ids), ref, atol=tol)


def test_dropout_is_identity_without_key_and_keyed_otherwise():
    model = small_gpt(dropout_rate=0.5)
    ids = jnp.arange(16)[None]
    np.testing.assert_array_equal(model(ids), model(ids))
    a = model(ids, dropout_key=jax.random.key(0))
    b = model(ids, dropout_key=jax.random.key(0))
    c = model(ids, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    x = jnp.ones((1000,))
    y = dropout(x, 0.25, jax.random.key(0))
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(float((y == 0).mean()) - 0.25) < 0.05


def test_linear_is_x_at_kernel_plus_bias():
    layer = Linear(3, 2, rngs=nnx.Rngs(params=0))
    x = jnp.arange(6.0).reshape(2, 3)
    expected = x @ layer.kernel[...] + layer.bias[...]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6)
    assert layer.kernel.shape == (3, 2)


def test_mlp_classifier_shapes():
    model = MLPClassifier(64, [32, 16], 10, rngs=nnx.Rngs(params=0))
    assert model(jnp.ones((5, 64))).shape == (5, 10)
    assert sorted(p for p, _ in named_layers(model)) == ["head", "layers/0", "layers/1"]


def test_named_layers_lists_gpt_linears_by_path():
    paths = sorted(p for p, _ in named_layers(small_gpt()))
    assert paths == [f"blocks/{i}/{name}" for i in range(2)
                     for name in ("attn/proj", "attn/qkv", "mlp/fc", "mlp/proj")]


def test_first_matching_rule_wins():
    model = small_gpt()
    rules = [RuleConfig(path=r"blocks/0/.*"), RuleConfig(path=r".*/mlp/.*")]
    assignment = assign_rules(model, rules)
    assert assignment["blocks/0/mlp/fc"] == 0
    assert assignment["blocks/1/mlp/fc"] == 1
    assert "blocks/1/attn/qkv" not in assignment


def test_rule_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"rules.1.path 'blocks/9/.\*' matches no layer"):
        assign_rules(small_gpt(), [RuleConfig(".*"), RuleConfig("blocks/9/.*")])
