"""Post-training pruning as pure functions (``sparsejax.posttrain.prune_layer``): masks
against NumPy references, SparseGPT's budgets and OBS updates, DSF's budget and error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.posttrain import PruneError, prune_layer
from sparsejax.transforms import Site, SpecError, View, build_spec
from sparsejax.transforms.prune import weighted_error
from sparsejax.transforms.prune.dsf import balance_factors, dsf_factorize

PATTERNS = [{"sparsity": 0.5}, {"sparsity": 0.3}, {"sparsity": 0.7}, {"n": 2, "m": 4},
            {"n": 1, "m": 4}, {"n": 2, "m": 8}]


def correlated_layer(n_in: int = 64, n_out: int = 96, tokens: int = 512, seed: int = 0,
                     diagonal: bool = False):
    """A random weight ``(in, out)`` and calibration inputs with correlated features (or,
    ``diagonal``, independent ones of unequal scales): ``(w, x, h = x^T x)``."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 3.0, size=n_in)
    x = rng.normal(size=(tokens, n_in)) * scales
    if not diagonal:
        x = x + rng.normal(size=(tokens, 4)) @ rng.normal(size=(4, n_in)) * 2.0
    x = x.astype(np.float32)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    h = (x.T @ x).astype(np.float32)
    return w, x, (np.diag(np.diag(h)) if diagonal else h)


# --------------------------------------------------------------------------- references


def reference_keep_mask(score: np.ndarray, pattern: dict) -> np.ndarray:
    """NumPy: prune the lowest scores per output column (stable: lower index first), or
    keep the n largest of every m consecutive inputs."""
    n_in, n_out = score.shape
    keep = np.ones_like(score, bool)
    if "n" in pattern:
        n, m = pattern["n"], pattern["m"]
        for j in range(n_out):
            for g in range(0, n_in, m):
                group = score[g:g + m, j]
                order = sorted(range(m), key=lambda i: (-group[i], i))
                keep[g:g + m, j] = [i in order[:n] for i in range(m)]
        return keep
    prune = round(pattern["sparsity"] * n_in)
    for j in range(n_out):
        keep[np.argsort(score[:, j], kind="stable")[:prune], j] = False
    return keep


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_magnitude_and_wanda_masks_equal_the_numpy_reference(method, pattern):
    w, x, h = correlated_layer(32, 24)
    w[3, :4] = w[5, :4] = 0.5  # ties: the lower input index goes first
    result = prune_layer(method, w, h, **pattern)
    norms = np.sqrt((x.astype(np.float64) ** 2).sum(0))  # ||X_i||_2 from the raw inputs
    score = np.abs(w) * (norms[:, None] if method == "wanda" else 1.0)
    expected = reference_keep_mask(score, pattern)
    np.testing.assert_array_equal(np.asarray(result.mask), expected)
    np.testing.assert_array_equal(np.asarray(result.weight), np.where(expected, w, 0.0))


def test_wanda_ranks_by_activation_norm_not_by_magnitude_alone():
    w = np.ones((4, 1), np.float32) * np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    h = np.diag([100.0, 100.0, 0.01, 0.01]).astype(np.float32)  # inputs 2, 3 barely fire
    assert np.asarray(prune_layer("wanda", w, h, sparsity=0.5).mask)[:, 0].tolist() == [
        True, True, False, False]
    assert np.asarray(prune_layer("magnitude", w, h, sparsity=0.5).mask)[:, 0].tolist() == [
        False, False, True, True]


# --------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("shape", [(64, 96), (160, 40)])
@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.73])
def test_sparsegpt_removes_exactly_the_requested_share(shape, sparsity):
    w, _, h = correlated_layer(*shape)
    result = prune_layer("sparsegpt", w, h, sparsity=sparsity, blocksize=32)
    mask = np.asarray(result.mask)
    assert (~mask).sum() == round(sparsity * w.size)
    assert np.all(np.asarray(result.weight)[~mask] == 0)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_sparsegpt_keeps_exactly_n_of_every_m(n, m):
    w, _, h = correlated_layer(64, 40)
    result = prune_layer("sparsegpt", w, h, n=n, m=m, blocksize=24)  # not a multiple of 8
    groups = np.asarray(result.mask).reshape(64 // m, m, 40).sum(1)
    assert np.all(groups == n)
    assert np.all(np.asarray(result.weight)[~np.asarray(result.mask)] == 0)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}], ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_output_error_is_at_most_wandas_and_magnitudes(pattern, seed):
    w, x, h = correlated_layer(seed=seed)

    def output_error(method):
        w_hat = np.asarray(prune_layer(method, w, h, **pattern).weight, np.float64)
        return np.linalg.norm(x @ w - x @ w_hat)

    sparsegpt = output_error("sparsegpt")
    assert sparsegpt <= output_error("wanda")
    assert sparsegpt <= output_error("magnitude")


def dampened_numpy(h: np.ndarray) -> np.ndarray:
    return h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))


def test_sparsegpt_removing_one_weight_is_the_obs_update_of_the_features_after_it():
    """One output, one weight removed: the weights before the removed one ``q`` stay, the
    ones from ``q`` on move by OBS's closed form over that trailing set ``F``,
    ``delta_F = -w_q / [H_F^-1]_qq * [H_F^-1]_{:,q}`` (SparseGPT's update never touches
    features it has already visited)."""
    w, _, h = correlated_layer(16, 1, seed=3)
    w64, hd = w[:, 0].astype(np.float64), dampened_numpy(h.astype(np.float64))
    upper = np.linalg.cholesky(np.linalg.inv(hd)).T
    q = int(np.argmin(w64 ** 2 / np.diag(upper) ** 2))
    assert 0 < q < 15, "the test layer must remove an interior weight"
    result = prune_layer("sparsegpt", w, h, sparsity=1 / 16)
    got = np.asarray(result.weight)[:, 0].astype(np.float64)
    hf_inv = np.linalg.inv(hd[q:, q:])
    expected = w64.copy()
    expected[q:] -= w64[q] / hf_inv[0, 0] * hf_inv[:, 0]
    assert np.asarray(result.mask)[:, 0].tolist() == [i != q for i in range(16)]
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    assert got[q] == 0


def test_sparsegpt_removing_the_first_weight_is_the_full_obs_update():
    w, _, h = correlated_layer(12, 1, seed=4)
    w[0, 0] = 1e-3  # the least salient weight is feature 0: OBS over every feature
    w64, hd = w[:, 0].astype(np.float64), dampened_numpy(h.astype(np.float64))
    h_inv = np.linalg.inv(hd)
    expected = w64 - w64[0] / h_inv[0, 0] * h_inv[:, 0]
    got = np.asarray(prune_layer("sparsegpt", w, h, sparsity=1 / 12).weight)[:, 0]
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-6)
    # and OBS's error is the least any single-weight removal with a refit can give
    err = float(weighted_error(w, np.asarray(got)[:, None], hd))
    assert err == pytest.approx(w64[0] ** 2 / h_inv[0, 0], rel=1e-3)


def test_a_calibration_matrix_of_zeros_is_refused_as_singular():
    w, _, _ = correlated_layer(16, 8)
    with pytest.raises(PruneError, match="singular"):
        prune_layer("sparsegpt", w, np.zeros((16, 16), np.float32), sparsity=0.5)


# --------------------------------------------------------------------------- DSF


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
@pytest.mark.parametrize("sparsity", [pytest.param(0.5, marks=pytest.mark.slow), 0.6,
                                      pytest.param(0.7, marks=pytest.mark.slow)])
def test_dsf_factors_hold_exactly_the_budget_and_multiply_to_the_weight(shape, sparsity):
    w, _, h = correlated_layer(*shape)
    result = prune_layer("dsf", w, h, sparsity=sparsity, rounds=6)
    (a, b), (a_mask, b_mask) = result.factors, result.factor_masks
    r = min(shape)
    assert a.shape == (shape[0], r) and b.shape == (r, shape[1])
    budget = round((1 - sparsity) * w.size)
    assert int(a_mask.sum()) + int(b_mask.sum()) == budget == result.nnz
    assert int((np.asarray(a) != 0).sum() + (np.asarray(b) != 0).sum()) == budget
    np.testing.assert_allclose(np.asarray(result.weight), np.asarray(a @ b), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_dsf_factors_are_balanced_without_changing_their_product(shape):
    """Column k of A and row k of B have equal norms (Adam fine-tunes both at one scale);
    balancing keeps the product and the zeros."""
    w, _, h = correlated_layer(*shape)
    result = prune_layer("dsf", w, h, sparsity=0.6, rounds=3)
    a, b = (np.asarray(f, np.float64) for f in result.factors)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1),
                               rtol=1e-4)
    scaled_a, scaled_b = balance_factors(jnp.asarray(a) * 100.0, jnp.asarray(b) / 100.0)
    np.testing.assert_allclose(np.asarray(scaled_a @ scaled_b), a @ b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(scaled_a) != 0, a != 0)
    np.testing.assert_allclose(np.asarray(scaled_a), a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(48, 80), pytest.param((80, 48), marks=pytest.mark.slow),
                                   pytest.param((64, 64), marks=pytest.mark.slow)])
def test_dsf_error_falls_over_the_rounds_when_h_is_diagonal(shape):
    """With independent inputs the rounds minimise the weighted error itself: each round
    may rise by at most 3 % (the masks are re-chosen in every solve, docs/methods.md
    §9.4), the error ends below half the first round's, and the final refit never
    raises it."""
    w, _, h = correlated_layer(*shape, diagonal=True)
    errors = np.array(dsf_factorize(w, h, 0.6).info["error"])
    rounds, refit = errors[:-1], errors[-1]
    assert np.all(rounds[1:] <= rounds[:-1] * 1.03)
    assert rounds[-1] < rounds[0] / 2
    assert refit <= rounds[-1] * (1 + 1e-5)


def test_dsf_error_trend_falls_with_correlated_inputs():
    """Off-diagonal H: the rounds minimise the diagonally scaled surrogate, so a round can
    raise the true weighted error (documented); the trend still falls: every 10-round
    window's mean is below the previous one's, and the refit lowers the error."""
    w, _, h = correlated_layer()
    errors = np.array(dsf_factorize(w, h, 0.6).info["error"])
    windows = errors[:40].reshape(4, 10).mean(1)
    assert np.all(np.diff(windows) < 0)
    assert errors[-1] < errors[-2]


@pytest.mark.parametrize("sparsity", [0.6, pytest.param(0.7, marks=pytest.mark.slow)])
def test_dsf_error_is_below_sparsegpts_at_equal_nonzeros(sparsity):
    w, _, h = correlated_layer()
    dsf = prune_layer("dsf", w, h, sparsity=sparsity)
    sparsegpt = prune_layer("sparsegpt", w, h, sparsity=sparsity)
    assert dsf.nnz == sparsegpt.nnz
    assert float(weighted_error(w, dsf.weight, h)) < float(weighted_error(w, sparsegpt.weight, h))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,needle", [
    (lambda w, h: prune_layer("obs", w, h, sparsity=0.5), "is not one of"),
    (lambda w, h: prune_layer("wanda", w, h, sparsity=1.0), "sparsity must be in"),
    (lambda w, h: prune_layer("wanda", w, h, sparsity=-0.1), "sparsity must be in"),
    (lambda w, h: prune_layer("sparsegpt", w, h, n=2, m=3), "not divisible by m=3"),
    (lambda w, h: prune_layer("sparsegpt", w, h, n=4, m=4), "needs 1 <= n < m"),
    (lambda w, h: prune_layer("dsf", w, h, n=2, m=4), "give sparsity"),
    (lambda w, h: prune_layer("sparsegpt", w, h[:8, :8], sparsity=0.5), "h (in, in)"),
    (lambda w, h: prune_layer("sparsegpt", w, h, sparsity=0.5, blocksise=8), "blocksize"),
], ids=["method", "sparsity-1", "sparsity-neg", "pattern", "n-eq-m", "dsf-nm", "h-shape",
        "typo"])
def test_bad_input_is_a_value_error_naming_what_is_wrong(call, needle):
    w, _, h = correlated_layer(16, 8)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call(w, h)


# --------------------------------------------------------------------------- in a layer


@pytest.mark.parametrize("method,pattern", [("sparsegpt", {"n": 2, "m": 4}),
                                            ("wanda", {"sparsity": 0.5}),
                                            ("dsf", {"sparsity": 0.6, "rounds": 4})])
@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_a_calibrated_transform_computes_the_pruned_weight(method, pattern, shape):
    """The prune transform's weight after :meth:`calibrate` is ``PruneResult.weight``;
    DSF's is the product of its kernel-shaped and square factors in the right order."""
    w, _, h = correlated_layer(*shape)
    spec = build_spec("prune", {"method": method, **pattern})
    site = Site("weights", shape)
    params = spec.params(site, jnp.asarray(w), jax.random.key(0))
    state = spec.init(site, jnp.asarray(w), jax.random.key(0))
    before, _ = spec.inference(jnp.asarray(w), params, state, site)
    np.testing.assert_allclose(np.asarray(before), w, rtol=1e-6)  # uncalibrated: as is
    new = spec.calibrate(site, View(jnp.asarray(w), params, state), jnp.asarray(h))
    after, _ = spec.inference(new.x, new.params, new.state, site)
    expected = spec.prune(jnp.asarray(w), jnp.asarray(h)).weight
    np.testing.assert_allclose(np.asarray(after), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert bool(new.state["pruned"])


def test_a_rule_cannot_both_prune_and_sparsify_one_layer():
    from sparsejax.transforms import rule_specs

    with pytest.raises(SpecError, match="both set the layer's sparsity stage"):
        rule_specs({"path": ".*", "sparsity": {"method": "ste"},
                    "prune": {"method": "wanda"}})


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "dsf"])
def test_float64_inputs_are_pruned_in_float64(method):
    """With ``jax_enable_x64``, float64 weights and Gram matrices stay float64 end to end:
    SparseGPT's one-weight removal then matches OBS's closed form to 1e-9."""
    with jax.enable_x64(True):
        w, _, h = correlated_layer(12, 1 if method == "sparsegpt" else 8, seed=4)
        w, h = w.astype(np.float64), h.astype(np.float64)
        w[0, 0] = 1e-3
        kwargs = {"sparsity": 1 / 12} if method == "sparsegpt" else {"sparsity": 0.5}
        if method == "dsf":
            kwargs["rounds"] = 3
        result = prune_layer(method, w, h, **kwargs)
        assert result.weight.dtype == jnp.float64
        if method == "sparsegpt":
            h_inv = np.linalg.inv(dampened_numpy(h))
            expected = w[:, 0] - w[0, 0] / h_inv[0, 0] * h_inv[:, 0]
            np.testing.assert_allclose(np.asarray(result.weight)[:, 0], expected, rtol=1e-9,
                                       atol=1e-12)
