"""SNIP (sparsity method ``snip``): connection sensitivity from the first batch."""

from __future__ import annotations

import numpy as np

from sparsejax.transforms.sparsity import SNIP
from tests.unstructured_helpers import hook, mask_of, sparse_linear


def test_mask_is_the_numpy_top_k_of_abs_g_times_w_at_step_0():
    lin = sparse_linear(SNIP(sparsity=0.9))
    w = np.asarray(lin.kernel[...])
    g = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    masked_grad = hook(lin, g, step=0)
    score = np.abs(g * w).ravel()
    k = round(0.1 * w.size)
    want = np.zeros(w.size, bool)
    want[np.argsort(-score, kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask_of(lin).ravel(), want)
    np.testing.assert_array_equal(masked_grad.ravel() != 0, want)
    before = mask_of(lin).copy()
    hook(lin, -g, step=1)  # fixed afterwards
    np.testing.assert_array_equal(mask_of(lin), before)
