"""SET (sparsity method ``set``): random regrowth of the dropped share."""

from __future__ import annotations

import numpy as np
import pytest

from sparsejax.config import ConfigError
from sparsejax.transforms.sparsity import SET
from tests.unstructured_helpers import hook, mask_of, rule, sparse_linear


def test_updates_keep_the_count_drop_the_smallest_and_grow_zeros():
    lin = sparse_linear(SET(sparsity=0.75, zeta=0.25, dt=5))
    k = mask_of(lin).sum()
    grad = np.ones((32, 16), np.float32)
    for step in range(1, 21):
        old = mask_of(lin).copy()
        w_old = np.abs(np.asarray(lin.kernel[...]))
        hook(lin, grad, step)
        mask = mask_of(lin)
        assert mask.sum() == k
        dropped, grown = old & ~mask, mask & ~old
        if step % 5:
            assert not dropped.any()
            continue
        assert dropped.sum() == grown.sum() == round(0.25 * k)
        assert w_old[dropped].max() <= w_old[old & mask].min()  # the smallest went
        assert np.all(np.asarray(lin.kernel[...])[grown] == 0)  # grown start at zero
        assert int(lin.sparsity.state["dropped"][...]) == dropped.sum()
        # weights grown at the last update and alive now
        prev = np.asarray(lin.sparsity.state["grown_mask"][...])
        np.testing.assert_array_equal(prev, grown)


def test_bad_settings_are_named(tiny_gpt):
    with pytest.raises(ConfigError, match=r"'rules\.0\.sparsity\.zeta'"):
        tiny_gpt(rule("set", zeta=1.5))
    with pytest.raises(ConfigError, match=r"'rules\.0\.sparsity\.end_fraction'.*within"):
        tiny_gpt(rule("set", end_fraction=1.5))
