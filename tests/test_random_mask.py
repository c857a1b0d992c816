"""Static random pruning (sparsity method ``random``)."""

from __future__ import annotations

import numpy as np

from sparsejax.transforms.sparsity import RandomMask
from tests.unstructured_helpers import hook, mask_of, sparse_linear


def test_mask_has_the_budget_is_keyed_by_the_layer_and_never_changes():
    a, b = sparse_linear(RandomMask(sparsity=0.8), seed=1), sparse_linear(
        RandomMask(sparsity=0.8), seed=1)
    np.testing.assert_array_equal(mask_of(a), mask_of(b))
    other = sparse_linear(RandomMask(sparsity=0.8), seed=2)
    assert (mask_of(a) != mask_of(other)).any()
    assert mask_of(a).sum() == round(0.2 * 512)
    before = mask_of(a).copy()
    for step in range(0, 400, 100):
        hook(a, np.ones((32, 16), np.float32), step)
    np.testing.assert_array_equal(mask_of(a), before)
    # neither biased to large weights nor to small ones
    w = np.abs(np.asarray(b.kernel[...]))
    assert 0.5 < w[before].mean() / w.mean() < 1.5
