"""One-shot magnitude pruning (sparsity method ``magnitude``)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsejax.transforms.sparsity import Magnitude
from tests.unstructured_helpers import hook, mask_of, sparse_linear


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_at_step_0_keeps_the_largest_magnitudes_of_the_weights_it_finds(sparsity):
    lin = sparse_linear(Magnitude(sparsity=sparsity))
    w = np.abs(np.asarray(lin.kernel[...])).ravel()
    k = round((1 - sparsity) * w.size)
    want = np.zeros(w.size, bool)
    want[np.argsort(-w, kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask_of(lin).ravel(), want)


def test_a_later_step_trains_dense_until_then_and_prunes_the_weights_of_that_step():
    lin = sparse_linear(Magnitude(sparsity=0.75, at_step=4))
    assert mask_of(lin).all()
    grad = np.ones((32, 16), np.float32)
    assert (hook(lin, grad, step=3) != 0).all()  # still dense
    w = np.abs(np.asarray(lin.kernel[...])).ravel()
    g = hook(lin, grad, step=4)
    mask = mask_of(lin).ravel()
    assert mask.sum() == 128 and w[mask].min() >= w[~mask].max()
    np.testing.assert_array_equal(g.ravel() != 0, mask)
    before = mask_of(lin).copy()
    hook(lin, grad, step=8)
    np.testing.assert_array_equal(mask_of(lin), before)  # fixed afterwards
    assert int(lin.sparsity.state["dropped"][...]) == 512 - 128
