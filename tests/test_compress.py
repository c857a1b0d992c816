"""Post-training compression to a bits-per-weight budget (``sparsejax compress``): the
storage each method is charged, and the run directory it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from sparsejax.compress import compress_run, compress_weight
from sparsejax.config import ConfigError
from sparsejax.evaluation import evaluate_model
from sparsejax.runs import load_model
from sparsejax.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT trained 20 steps, with an STE rule on the MLP's fc layers."""
    from sparsejax.config import load_config
    from tests.conftest import TINY_GPT

    out = tmp_path_factory.mktemp("compress") / "source"
    cfg = load_config(None, [*TINY_GPT, "train.steps=20", f"run_dir={out}", "name=source",
                             "rules=[{path: 'blocks/\\d+/mlp/fc', sparsity: {method: ste}}]"])
    run(cfg, verbose=False)
    return out


def test_each_method_stays_within_its_budget_and_more_bits_lower_the_error():
    w = jax.random.normal(jax.random.key(0), (96, 160))
    for method in ("signed_cuts", "svd"):
        errors = []
        for bits in (0.5, 1.0, 2.0):
            approx, used = compress_weight(method, w, bits)
            assert approx.shape == w.shape and used <= bits
            errors.append(float(np.linalg.norm(approx - w) / np.linalg.norm(w)))
        assert errors[0] > errors[1] > errors[2]
    approx, used = compress_weight("rtn", w, 2.0)
    assert used == 2.0 + 16 / 96  # the per-column scale is charged
    per_column = [np.unique(np.asarray(approx[:, j])) for j in range(160)]
    assert max(len(u) for u in per_column) <= 3  # 2-bit symmetric: -1, 0, 1 times a scale


def test_minmax_rtn_uses_all_levels_from_column_min_to_max_and_charges_two_scalars():
    w = np.asarray(jax.random.normal(jax.random.key(1), (96, 160)))
    approx, used = compress_weight("rtn_minmax", w, 2.0)
    approx = np.asarray(approx)
    assert used == 2.0 + 32 / 96  # a 16-bit scale and a 16-bit zero point per column
    for j in range(160):
        lo, hi = w[:, j].min(), w[:, j].max()
        levels = lo + (hi - lo) / 3 * np.arange(4)
        np.testing.assert_allclose(np.unique(approx[:, j]), levels, rtol=1e-5, atol=1e-6)
        # round to the nearest level
        nearest = levels[np.argmin(np.abs(w[:, j, None] - levels), axis=1)]
        np.testing.assert_allclose(approx[:, j], nearest, rtol=1e-5, atol=1e-6)
    absmax_error = np.linalg.norm(np.asarray(compress_weight("rtn", w, 2.0)[0]) - w)
    assert np.linalg.norm(approx - w) < absmax_error  # 4 levels beat absmax's 3


@pytest.mark.slow
def test_compressed_run_reloads_with_the_reported_loss(trained, tmp_path):
    out = tmp_path / "cuts"
    report = compress_run(trained, out, method="signed_cuts", bits=1.0, progress=None)
    saved = json.loads((out / "compress.json").read_text())
    assert saved["bits_per_weight"] == pytest.approx(report["bits_per_weight"])
    assert report["bits_per_weight"] <= 1.0
    assert [layer["path"] for layer in report["per_layer"]] == [
        f"blocks/{i}/{name}" for i in range(2)
        for name in ("attn/proj", "attn/qkv", "mlp/fc", "mlp/proj")]
    model, cfg, step = load_model(out)
    assert step == 0
    assert evaluate_model(model, cfg)["loss"] == pytest.approx(report["after"]["loss"],
                                                               rel=1e-5)
    assert report["after"]["loss"] != pytest.approx(report["before"]["loss"], rel=1e-4)
    assert model.blocks[0].mlp.fc.sparsity is None  # the STE rule is folded and gone


@pytest.mark.slow
def test_bad_input_is_refused_in_one_line_and_writes_nothing(trained, tmp_path):
    for kwargs, match in [({"method": "foo", "bits": 1.0}, "--method 'foo'"),
                          ({"method": "svd", "bits": 0.0}, "--bits must be > 0"),
                          ({"method": "svd", "bits": 1.0, "layers": "nope"},
                           "matches no linear layer")]:
        with pytest.raises(ConfigError, match=match):
            compress_run(trained, tmp_path / "x", progress=None, **kwargs)
        assert not (tmp_path / "x").exists()
    done = subprocess.run([sys.executable, "-m", "sparsejax", "compress", str(trained),
                           "--method", "svd", "--bits", "1", "--out", str(trained)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "exists" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
