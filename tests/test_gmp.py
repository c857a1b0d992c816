"""Gradual magnitude pruning (sparsity method ``gmp``): the cubic schedule and its masks."""

from __future__ import annotations

import numpy as np
import pytest

from sparsejax.config import ConfigError
from sparsejax.transforms.sparsity import GMP
from sparsejax.transforms.sparsity.gmp import gmp_sparsity
from tests.unstructured_helpers import hook, mask_of, rule, sparse_linear


@pytest.mark.parametrize("t", [0, 10, 25, 50, 75, 100, 130])
def test_schedule_matches_the_formula(t):
    s_i, s_f, t0, dt, n = 0.1, 0.9, 10, 10, 8  # ramp from step 10 to 90
    frac = min(max((t - t0) / (n * dt), 0.0), 1.0)
    want = s_f + (s_i - s_f) * (1 - frac) ** 3
    assert float(gmp_sparsity(t, s_i, s_f, t0, dt, n)) == pytest.approx(want, abs=1e-6)


def test_masks_follow_the_schedule_and_pruned_weights_stay_pruned():
    spec = GMP(sparsity=0.8, initial_sparsity=0.0, start=0, dt=10, updates=4)
    lin = sparse_linear(spec)
    size = 32 * 16
    assert mask_of(lin).all()
    grad = np.ones((32, 16), np.float32)
    previous = mask_of(lin).copy()
    for step in range(1, 41):
        hook(lin, grad, step)
        mask = mask_of(lin)
        if step % 10 == 0:
            s_f = 1 - round(0.2 * size) / size  # the budget the layer keeps exactly
            s_t = s_f + (0.0 - s_f) * (1 - step / 40) ** 3
            assert mask.sum() == round((1 - s_t) * size), step
        else:
            np.testing.assert_array_equal(mask, previous)
        assert not (mask & ~previous).any()  # dense-to-sparse: nothing regrows
        previous = mask.copy()
    assert mask.sum() == round(0.2 * size)


def test_a_ramp_beyond_training_is_refused(tiny_gpt):
    with pytest.raises(ConfigError, match=r"'rules\.0\.sparsity\.updates'.*beyond training"):
        tiny_gpt(rule("gmp", dt=10, updates=5), "train.steps=30")
    with pytest.raises(ConfigError, match=r"'rules\.0\.sparsity\.dt'"):
        tiny_gpt(rule("gmp", dt=0))
