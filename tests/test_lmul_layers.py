"""L-Mul and FP8 attention (``attention: {method: lmul | fp8}``) and L-Mul linears
(``quant: {weights: {method: lmul}}``): the products they compute, straight-through
gradients, causality and cached decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.config import ConfigError
from sparsejax.numerics import lmul
from sparsejax.quant import fp8
from sparsejax.runs import init_model
from sparsejax.transforms import Context, Site, build_spec
from tests.helpers.decoding import cached_logits


def qkv(seed=0, b=2, t=12, h=2, d=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (b, t, h, d)) for k in keys)


def reference_attention(q, k, v, product):
    """NumPy-shaped reference: per batch and head, ``softmax(prod(q, k^T) / sqrt(d))``
    causal, then ``prod(p, v)``; ``product(a, b)`` multiplies elementwise-and-sums."""
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            s = product(q[bi, :, hi], k[bi, :, hi].T) / np.sqrt(d)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            out[bi, :, hi] = product(p.astype(np.float32), v[bi, :, hi])
    return out


def attend(method: str, q, k, v, **fields):
    spec = build_spec("attention", {"method": method, **fields})
    site = Site("attention", q.shape[2:])
    return spec.attend(q, k, v, jnp.arange(q.shape[1]), {}, {}, site,
                       Context(True, jax.random.key(0)))[0]


@pytest.mark.parametrize("m", [3, 4])
def test_lmul_attention_multiplies_both_products_by_lmul(m):
    q, k, v = (np.asarray(t) for t in qkv())

    def lmul_product(a, b):
        return np.asarray(lmul(a[:, :, None], b[None], m), np.float64).sum(axis=1)

    expected = reference_attention(q, k, v, lmul_product)
    got = np.asarray(attend("lmul", q, k, v, mantissa_bits=m, k_tile=5))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    exact = reference_attention(q, k, v, lambda a, b: a.astype(np.float64) @ b)
    assert not np.allclose(got, exact, atol=1e-3)


def test_fp8_attention_rounds_each_product_operand_per_token_through_the_format():
    q, k, v = qkv(1)

    def per_token(x):  # one amax scale per row
        return np.stack([np.asarray(fp8(jnp.asarray(row))) for row in x])

    def fp8_product(a, b):  # b: k^T or v, rounded per key before
        return per_token(a).astype(np.float64) @ b

    k8, v8 = (np.stack([[per_token(t[bi, :, hi]) for hi in range(2)] for bi in range(2)])
              .transpose(0, 2, 1, 3) for t in (np.asarray(k), np.asarray(v)))
    got = np.asarray(attend("fp8", q, k, v))
    np.testing.assert_allclose(got, reference_attention(np.asarray(q), k8, v8, fp8_product),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, reference_attention(np.asarray(q), np.asarray(k),
                                                    np.asarray(v), np.matmul), atol=1e-4)


@pytest.mark.parametrize("method", [pytest.param("lmul", marks=pytest.mark.slow), "fp8"])
def test_gradients_are_straight_through_and_outputs_causal(method):
    q, k, v = qkv(2)

    def loss(q, k, v):
        return jnp.sum(attend(method, q, k, v) * jnp.arange(8.0))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    exact = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, is_causal=True) * jnp.arange(8.0)), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, exact, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.corrcoef(np.asarray(g).ravel(), np.asarray(e).ravel())[0, 1] > 0.9
    out = attend(method, q, k, v)
    out2 = attend(method, q, k.at[:, 7:].set(3.0), v.at[:, 7:].set(-3.0))
    np.testing.assert_array_equal(np.asarray(out)[:, :7], np.asarray(out2)[:, :7])


@pytest.mark.slow
def test_lmul_attention_gpt_decodes_through_its_cache_like_the_full_forward(tiny_gpt):
    model = init_model(tiny_gpt("rules=[{path: 'blocks/\\d+/attn', attention: "
                                "{method: lmul, mantissa_bits: 3}}]"))
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (1, 10), 0, 255)
    np.testing.assert_allclose(np.asarray(cached_logits(model, ids, 4)),
                               np.asarray(model(ids)), atol=2e-5)


def test_lmul_linear_multiplies_by_lmul_with_the_exact_gradient(tiny_gpt):
    model = init_model(tiny_gpt("rules=[{path: 'blocks/0/mlp/fc', quant: {weights: "
                                "{method: lmul, mantissa_bits: 4}}}]"))
    layer = model.blocks[0].mlp.fc
    x = jax.random.normal(jax.random.key(3), (5, layer.in_features))
    w, b = layer.kernel[...], layer.bias[...]
    expected = np.asarray(lmul(x[:, :, None], w[None], 4), np.float64).sum(1) + b
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-4, atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(layer(x) * 2.0))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(2.0 * w.sum(1))[None].repeat(5, 0),
                               rtol=1e-5)


def test_bad_mantissa_bits_are_refused_naming_the_field(tiny_gpt):
    with pytest.raises(ConfigError, match=r"rules\.0\.attention\.mantissa_bits"):
        tiny_gpt("rules=[{path: 'blocks/\\d+/attn', attention: {method: lmul, "
                 "mantissa_bits: 0}}]")
