"""``sparsejax compare``: real runs compared layer by layer, values checked against hand
computations, the TensorBoard events read back with TensorBoard's own reader and over the
HTTP API of a real ``tensorboard`` server, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sparsejax.cli import main
from sparsejax.compare import CompareError, compare_checkpoints, format_rows
from sparsejax.config import load_config
from sparsejax.train import load_model, run
from tests.conftest import TINY_GPT

FFN_SSTE = "rules=[{path: 'blocks/\\d+/mlp/(fc|proj)', sparsity: {method: sste}}]"
QUANT = ("rules=[{path: 'blocks/\\d+/mlp/fc', quant: {weights: {method: dat, bits: 2}}}]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    variants = {"dense": [], "sste": [FFN_SSTE], "dat": [QUANT],
                "small": ["model.n_layer=1"]}
    for name, extra in variants.items():
        run(load_config(None, [*TINY_GPT, "train.steps=20", f"name={name}",
                               f"run_dir={root / name}", *extra]), verbose=False)
    return {name: root / name for name in variants}


def rows_for(rows, checkpoint_prefix):
    return {r["layer"]: r for r in rows if r["checkpoint"].startswith(checkpoint_prefix)
            and "note" not in r}


def test_identical_checkpoints_have_distance_0_and_overlap_1(runs):
    rows = compare_checkpoints([runs["sste"], runs["sste"]])
    second = rows_for(rows, "sste@20#2")
    assert len(second) == 8
    for layer, row in second.items():
        assert row["rel_distance"] == 0.0 and row["cosine"] == pytest.approx(1.0, abs=1e-6)
        if "mlp" in layer:
            assert row["mask_overlap"] == 1.0 and row["mask_hamming"] == 0.0
            assert row["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_dense_vs_sparse_values_match_a_hand_computation(runs):
    rows = compare_checkpoints([runs["dense"], runs["sste"]])
    dense_model, _, _ = load_model(runs["dense"])
    sste_model, _, _ = load_model(runs["sste"])
    w0 = np.asarray(dense_model.blocks[0].mlp.fc.kernel[...])
    w1 = np.asarray(sste_model.blocks[0].mlp.fc.effective_kernel())
    row = rows_for(rows, "sste@20")["blocks/0/mlp/fc"]
    np.testing.assert_allclose(row["rel_distance"],
                               np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rtol=1e-5)
    np.testing.assert_allclose(row["cosine"], np.sum(w0 * w1) / np.linalg.norm(w0)
                               / np.linalg.norm(w1), rtol=1e-5)
    assert row["sparsity"] == pytest.approx(np.mean(w1 == 0))
    assert "mask_overlap" not in row  # the reference is dense
    assert rows_for(rows, "dense@20")["blocks/0/mlp/fc"]["sparsity"] == 0.0


def test_quantised_layers_report_their_error(runs):
    rows = compare_checkpoints([runs["dense"], runs["dat"]])
    dat = rows_for(rows, "dat@20")
    assert dat["blocks/0/mlp/fc"]["quant_mse"] > 0
    assert "quant_mse" not in dat["blocks/0/mlp/proj"]


def test_mismatched_architectures_compare_shared_layers_and_list_the_rest(runs):
    rows = compare_checkpoints([runs["small"], runs["dense"]])
    shared = rows_for(rows, "dense@20")
    assert sorted(shared) == ["blocks/0/attn/proj", "blocks/0/attn/qkv", "blocks/0/mlp/fc",
                              "blocks/0/mlp/proj"]
    notes = [r["layer"] for r in rows if "note" in r]
    assert notes == ["blocks/1/attn/proj", "blocks/1/attn/qkv", "blocks/1/mlp/fc",
                     "blocks/1/mlp/proj"]
    assert "not in every checkpoint" in format_rows(rows)


def test_checkpoint_directory_and_step_arguments(runs):
    rows = compare_checkpoints([runs["sste"] / "checkpoints" / "10", runs["sste"]])
    later = rows_for(rows, "sste@20")
    assert all(r["rel_distance"] > 0 for r in later.values())
    assert all(0 < r["mask_overlap"] <= 1 for layer, r in later.items() if "mlp" in layer)
    same = compare_checkpoints([runs["sste"], runs["sste"]], step=10)
    assert {r["step"] for r in same if "step" in r} == {10}


def test_tensorboard_events_hold_scalars_histograms_images_and_text(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    compare_checkpoints([runs["sste"], runs["sste"]], logdir=tmp_path, name="cmp")
    run_dirs = sorted(p for p in (tmp_path / "cmp").iterdir())
    assert [p.name for p in run_dirs] == ["sste@20", "sste@20#2"]
    acc = EventAccumulator(str(run_dirs[1]), size_guidance={"scalars": 0, "histograms": 0,
                                                            "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    distance = acc.Scalars("compare/blocks/0/mlp/fc/rel_distance")
    assert [(e.step, e.value) for e in distance] == [(20, 0.0)]
    assert acc.Scalars("compare/blocks/1/mlp/proj/mask_overlap")[0].value == 1.0
    assert "weights/blocks/0/attn/qkv" in tags["histograms"]
    hist = acc.Histograms("weights/blocks/0/mlp/fc")[0].histogram_value
    assert hist.num == 32 * 128  # every entry of the (32, 128) kernel
    assert "pattern/blocks/0/mlp/fc" in tags["images"]
    assert "pattern/blocks/0/attn/qkv" not in tags["images"]  # dense: no pattern
    text = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "blocks/0/mlp/fc" in text and "rel_distance" in text


def test_cli_compare_prints_the_table(runs, tmp_path, capsys):
    code = main(["compare", str(runs["dense"]), str(runs["sste"]), "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "blocks/1/mlp/proj" in out and "tensorboard --logdir" in out
    assert (tmp_path / "dense_vs_sste" / "sste@20").is_dir()


def test_missing_checkpoint_is_one_line_exit_2(runs, tmp_path, capsys):
    code = main(["compare", str(runs["dense"]), str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "checkpoint not found" in err and "\n" not in err
    assert main(["compare", str(runs["dense"]), str(runs["dense"]), "--step", "7"]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err


def test_corrupt_checkpoint_is_one_line_exit_2(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs["dense"], broken)
    for f in (broken / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 10)  # truncate the array data
    code = main(["compare", str(runs["dense"]), str(broken)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(broken) in err


def test_compare_needs_two_checkpoints(runs):
    with pytest.raises(CompareError, match="at least two"):
        compare_checkpoints([runs["dense"]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_tensorboard_server_serves_the_comparison(runs, tmp_path):
    compare_checkpoints([runs["dense"], runs["sste"]], logdir=tmp_path, name="cmp")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "cmp"),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = urllib.parse.urlencode({"run": "sste@20",
                                    "tag": "compare/blocks/0/mlp/fc/sparsity"})
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
    try:
        deadline, data = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.loads(response.read())
                if data:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        assert data, "tensorboard did not serve the scalar within 90 s"
        wall_time, step, value = data[0]
        assert step == 20 and value == pytest.approx(0.5, abs=1e-3)
    finally:
        server.terminate()
        server.wait(timeout=30)
