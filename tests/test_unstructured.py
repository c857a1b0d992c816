"""What the unstructured methods share (sparsejax/transforms/sparsity/unstructured.py):
ERK and uniform budgets, exact top-k masks, the masked forward and gradient, the
config errors, and exact per-layer sparsity after every update of a training run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.config import ConfigError
from sparsejax.nn import named_layers
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from sparsejax.transforms import Site
from sparsejax.transforms.sparsity import RandomMask, erk_densities, top_k_mask
from sparsejax.transforms.sparsity.unstructured import drop_and_grow
from tests.unstructured_helpers import hook, mask_of, rule, sparse_linear


def test_erk_densities_follow_the_closed_form():
    shapes = [(64, 64), (64, 256), (256, 64)]
    d = erk_densities(shapes, 0.9)
    raw = [(a + b) / (a * b) for a, b in shapes]
    eps = 0.1 * sum(a * b for a, b in shapes) / sum(r * a * b for r, (a, b) in
                                                    zip(raw, shapes, strict=True))
    np.testing.assert_allclose(d, [eps * r for r in raw], rtol=1e-12)
    kept = sum(x * a * b for x, (a, b) in zip(d, shapes, strict=True))
    assert kept == pytest.approx(0.1 * sum(a * b for a, b in shapes))


def test_erk_caps_layers_that_would_be_denser_than_one():
    shapes = [(4, 2), (512, 512), (512, 512)]  # the tiny layer would need density > 1
    d = erk_densities(shapes, 0.5)
    assert d[0] == 1.0
    budget = 0.5 * sum(a * b for a, b in shapes) - 8
    eps = budget / sum((a + b) for a, b in shapes[1:])  # raw * size = a + b
    np.testing.assert_allclose(d[1:], [eps * (1024 / 512 ** 2)] * 2, rtol=1e-12)


def test_uniform_and_erk_plans_keep_exact_counts():
    sites = [Site("weights", (32, 96)), Site("weights", (128, 32))]
    for dist in ("uniform", "erk"):
        planned = RandomMask(sparsity=0.8, distribution=dist).plan(sites)
        total = sum(p.keep(s) for p, s in zip(planned, sites, strict=True))
        assert abs(total - 0.2 * sum(s.size for s in sites)) <= len(sites)
    assert [p.keep(s) for p, s in zip(RandomMask(sparsity=0.8).plan(sites), sites,
                                      strict=True)] == [round(0.2 * 3072), round(0.2 * 4096)]


@pytest.mark.parametrize("k", [0, 1, 7, 64])
def test_top_k_mask_keeps_exactly_k_with_ties_to_the_lower_index(k):
    score = jnp.asarray(np.repeat(np.arange(16.0), 4).reshape(8, 8))  # ties in fours
    mask = np.asarray(top_k_mask(score, k))
    assert mask.sum() == k
    flat = np.asarray(score).ravel()
    want = np.argsort(-flat, kind="stable")[:k]
    assert set(np.flatnonzero(mask.ravel())) == set(want)


def test_drop_and_grow_keeps_the_active_count_and_skips_the_just_dropped():
    mask = jnp.asarray([True, True, True, False, False, False])
    mag = jnp.asarray([0.1, 0.5, 0.9, 0.0, 0.0, 0.0])
    grow = jnp.asarray([9.0, 9.0, 9.0, 1.0, 3.0, 2.0])  # active entries score high: ignored
    new = np.asarray(drop_and_grow(mask, mag, grow, 3, 2))
    np.testing.assert_array_equal(new, [False, False, True, False, True, True])


def test_forward_masks_and_the_hook_masks_the_gradient():
    lin = sparse_linear(RandomMask(sparsity=0.75))
    mask = mask_of(lin)
    assert mask.sum() == round(0.25 * 32 * 16)
    x = jnp.ones((2, 32))
    np.testing.assert_allclose(lin(x), x @ (lin.kernel[...] * mask) + lin.bias[...], rtol=1e-6)
    g = hook(lin, np.ones((32, 16), np.float32), step=5)
    np.testing.assert_array_equal(g != 0, mask)
    assert np.all(np.asarray(lin.kernel[...])[~mask] == 0)  # pruned weights are zero


@pytest.mark.parametrize("override, key", [
    ("sparsity: 1.0", "sparsity"), ("sparsity: -0.1", "sparsity"),
    ("distribution: lognormal", "distribution")])
def test_bad_budget_is_named(tiny_gpt, override, key):
    with pytest.raises(ConfigError, match=rf"'rules\.0\.sparsity\.{key}'"):
        tiny_gpt(rule("random", **dict([override.split(": ")])))


def test_budget_that_keeps_no_weight_is_refused_in_one_line(tiny_gpt):
    # ConfigError: the CLI prints it as one line and exits 2 (tests/test_faults.py)
    with pytest.raises(ConfigError, match=r"^rules\.0: a uniform budget of sparsity 0\.99999 "
                                          r"keeps no weight of a layer of shape"):
        init_model(tiny_gpt(rule("random", sparsity=0.99999)))


@pytest.mark.parametrize("dist", [pytest.param("uniform", marks=pytest.mark.slow), "erk"])
def test_realised_sparsity_is_exact_per_layer_after_every_update(tiny_gpt, tmp_path, dist):
    cfg = tiny_gpt(rule("rigl", sparsity=0.8, distribution=dist, dt=3, end_fraction=1.0),
                   "train.steps=12", "checkpoint.every=3", "checkpoint.keep=10")
    planned = {p: layer.sparsity.spec.keep(layer.sparsity.site)
               for p, layer in named_layers(init_model(cfg))}
    run(cfg, verbose=False)
    for step in (3, 6, 9, 12):  # checkpoints right after the updates at steps 3, 6, 9
        model, _, _ = load_model(tmp_path / "run", step)
        for path, layer in named_layers(model):
            kept = int(np.sum(np.asarray(layer.effective_kernel()) != 0))
            assert mask_of(layer).sum() == planned[path], (step, path)
            assert kept <= planned[path]
