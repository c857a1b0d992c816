"""``sparsejax compare``: real runs compared layer by layer, values checked against hand
computations, the TensorBoard events read back with TensorBoard's own reader and over the
HTTP API of a real ``tensorboard`` server, and bad input as one line with exit code 2."""

from __future__ import annotations

import io
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
from sparsejax.compare import (
    CELL,
    GROUP_LINE,
    PATTERN_COLOURS,
    SWATCH,
    CompareError,
    compare_checkpoints,
    format_rows,
    mask_difference_image,
    random_mask_overlap,
)
from sparsejax.config import load_config
from sparsejax.runs import load_model
from sparsejax.train import run
from tests.conftest import TINY_GPT

FFN = "blocks/\\d+/mlp/(fc|proj)"
FFN_SSTE = f"rules=[{{path: '{FFN}', sparsity: {{method: sste}}}}]"
FFN_STE = f"rules=[{{path: '{FFN}', sparsity: {{method: ste}}}}]"
QUANT = "rules=[{path: 'blocks/\\d+/mlp/fc', quant: {weights: {method: dat, bits: 2}}}]"
READ_ALL = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    variants = {"dense": [], "sste": [FFN_SSTE], "ste": [FFN_STE], "dat": [QUANT],
                "small": ["model.n_layer=1"]}
    for name, extra in variants.items():
        run(load_config(None, [*TINY_GPT, "train.steps=20", f"name={name}",
                               f"run_dir={root / name}", *extra]), verbose=False)
    return {name: root / name for name in variants}


def layer_rows(result, step=None):
    return {r["layer"]: r for r in result.table(step=step)}


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance=READ_ALL)
    acc.Reload()
    return acc


def hparams_of(acc) -> dict:
    from google.protobuf.json_format import MessageToDict
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: MessageToDict(v) for k, v in start.hparams.items()}


def png_pixels(encoded: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def colour_counts(image: np.ndarray) -> dict[str, int]:
    return {name: int(np.sum(np.all(image == colour, axis=-1)))
            for name, colour in PATTERN_COLOURS.items()}


def expected_counts(kept_a: np.ndarray, kept_b: np.ndarray, legend: bool = True
                    ) -> dict[str, int]:
    """NumPy reference: cells of each kind times the pixels of a cell (+ a legend swatch)."""
    cells = {"kept in both": kept_a & kept_b, "only A": kept_a & ~kept_b,
             "only B": ~kept_a & kept_b, "pruned in both": ~kept_a & ~kept_b}
    return {k: int(v.sum()) * (CELL - 1) ** 2 + (SWATCH**2 if legend else 0)
            for k, v in cells.items()}


def random_nm_mask(rng, rows: int, cols: int, n: int = 2, m: int = 4) -> np.ndarray:
    """Boolean (rows, cols): n kept in every m consecutive entries of a row."""
    scores = rng.random((rows, cols // m, m))
    ranks = np.argsort(np.argsort(-scores, axis=-1), axis=-1)
    return (ranks < n).reshape(rows, cols)


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_random_overlap_matches_simulated_random_nm_masks(n, m):
    rng = np.random.default_rng(0)
    a, b = random_nm_mask(rng, 256, 512, n, m), random_nm_mask(rng, 256, 512, n, m)
    simulated = np.sum(a & b) / np.sum(a | b)
    assert random_mask_overlap(n / m, n / m) == pytest.approx(simulated, abs=0.01)
    assert random_mask_overlap(0.5, 0.5) == pytest.approx(1 / 3)


@pytest.mark.parametrize("da,db", [(0.1, 0.1), (0.2, 0.5), (0.9, 0.3)])
def test_random_overlap_matches_simulated_unstructured_masks(da, db):
    rng = np.random.default_rng(1)
    a, b = rng.random(200_000) < da, rng.random(200_000) < db
    assert random_mask_overlap(da, db) == pytest.approx(np.sum(a & b) / np.sum(a | b),
                                                        abs=0.005)


@pytest.mark.parametrize("group", [4, 8, None])
def test_difference_image_colours_count_each_kind_of_cell(group):
    rng = np.random.default_rng(2)
    kept_a, kept_b = random_nm_mask(rng, 16, 48), random_nm_mask(rng, 16, 48)
    image = mask_difference_image(kept_a, kept_b, group)
    assert image.dtype == np.uint8 and image.shape[1] == 48 * CELL + 1
    assert colour_counts(image) == expected_counts(kept_a, kept_b)
    tile = image[:16 * CELL + 1]
    if group:  # the group grid: a black column of pixels every `group` weights
        for x in range(0, 48 * CELL + 1, group * CELL):
            assert np.all(tile[:, x] == GROUP_LINE)
        assert not np.all(tile[:, CELL] == GROUP_LINE)  # within a group: light lines
    else:
        assert not np.any(np.all(tile[:, 1:-1] == GROUP_LINE, axis=-1))
    bare = mask_difference_image(kept_a, kept_b, group, legend=False)
    assert colour_counts(bare) == expected_counts(kept_a, kept_b, legend=False)


def test_difference_image_refuses_masks_of_different_shapes():
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(8, 4\)"):
        mask_difference_image(np.ones((4, 8), bool), np.ones((8, 4), bool))


# --------------------------------------------------------------------------- real runs


def test_identical_runs_have_distance_0_and_overlap_1_at_every_shared_step(runs):
    result = compare_checkpoints([runs["sste"], runs["sste"]])
    assert len(result.pairs) == 1 and result.steps(result.pairs[0]) == [10, 20]
    for step in (10, 20):
        rows = layer_rows(result, step)
        assert len(rows) == 8
        for layer, row in rows.items():
            assert row["rel_distance"] == 0.0
            assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
            if "mlp" in layer:
                assert row["mask_overlap"] == 1.0
                assert row["sparsity_a"] == row["sparsity_b"] == pytest.approx(0.5, abs=1e-3)
                assert row["random_overlap"] == pytest.approx(1 / 3, abs=1e-3)
            else:
                assert "mask_overlap" not in row and row["sparsity_b"] == 0.0


def test_dense_vs_sparse_values_match_a_hand_computation(runs):
    result = compare_checkpoints([runs["dense"], runs["sste"]])
    dense_model, _, _ = load_model(runs["dense"])
    sste_model, _, _ = load_model(runs["sste"])
    w0 = np.asarray(dense_model.blocks[0].mlp.fc.kernel[...])
    w1 = np.asarray(sste_model.blocks[0].mlp.fc.effective_kernel())
    row = layer_rows(result)["blocks/0/mlp/fc"]
    np.testing.assert_allclose(row["rel_distance"],
                               np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rtol=1e-5)
    np.testing.assert_allclose(row["cosine"], np.sum(w0 * w1) / np.linalg.norm(w0)
                               / np.linalg.norm(w1), rtol=1e-5)
    assert row["sparsity_b"] == pytest.approx(np.mean(w1 == 0)) and row["sparsity_a"] == 0
    assert "mask_overlap" not in row  # A is dense


def test_sparse_pair_overlap_matches_a_hand_computation(runs):
    result = compare_checkpoints([runs["sste"], runs["ste"]], steps=[10])
    a, _, _ = load_model(runs["sste"], 10)
    b, _, _ = load_model(runs["ste"], 10)
    ka = np.asarray(a.blocks[1].mlp.proj.effective_kernel()) != 0
    kb = np.asarray(b.blocks[1].mlp.proj.effective_kernel()) != 0
    row = layer_rows(result, 10)["blocks/1/mlp/proj"]
    assert row["mask_overlap"] == pytest.approx(np.sum(ka & kb) / np.sum(ka | kb))
    assert result.pairs[0].name == "b(ste)_vs_a(sste)"
    assert result.pairs[0].diff == {"rules.0.sparsity.method": ("sste", "ste")}


def test_quantised_layers_report_their_error(runs):
    rows = layer_rows(compare_checkpoints([runs["dense"], runs["dat"]]))
    assert rows["blocks/0/mlp/fc"]["quant_mse_b"] > 0
    assert "quant_mse_b" not in rows["blocks/0/mlp/proj"]
    assert "quant_mse_a" not in rows["blocks/0/mlp/fc"]


def test_mismatched_architectures_compare_shared_layers_and_list_the_rest(runs):
    result = compare_checkpoints([runs["small"], runs["dense"]])
    assert sorted(layer_rows(result)) == ["blocks/0/attn/proj", "blocks/0/attn/qkv",
                                          "blocks/0/mlp/fc", "blocks/0/mlp/proj"]
    notes = [r["layer"] for r in result.rows if "note" in r]
    assert notes == ["blocks/1/attn/proj", "blocks/1/attn/qkv", "blocks/1/mlp/fc",
                     "blocks/1/mlp/proj"]
    assert "not in both checkpoints" in format_rows(result)
    assert "blocks/1/mlp/fc" in result.markdown()


def test_checkpoint_directories_give_one_point_per_pair(runs):
    result = compare_checkpoints([runs["sste"] / "checkpoints" / "10", runs["sste"]])
    pair = result.pairs[0]
    assert result.steps(pair) == [20] and pair.name == "b(sste@20)_vs_a(sste@10)"
    later = layer_rows(result)
    assert all(r["rel_distance"] > 0 and r["step_a"] == 10 for r in later.values())
    assert all(0 < r["mask_overlap"] <= 1 for layer, r in later.items() if "mlp" in layer)


def test_steps_select_checkpoints_and_a_missing_step_is_refused(runs):
    result = compare_checkpoints([runs["dense"], runs["sste"], runs["ste"]], steps=[10])
    assert [p.name for p in result.pairs] == ["b(sste)_vs_a(dense)", "c(ste)_vs_a(dense)"]
    assert {r["step"] for r in result.rows if "step" in r} == {10}
    with pytest.raises(CompareError, match=r"dense: no checkpoint at step 7 \(have \[10, 20\]\)"):
        compare_checkpoints([runs["dense"], runs["sste"]], steps=[7])
    with pytest.raises(CompareError, match="give its run directory"):
        compare_checkpoints([runs["dense"] / "checkpoints" / "10", runs["sste"]], steps=[10])


def test_tensorboard_has_one_run_per_pair_with_values_at_every_shared_step(runs, tmp_path):
    result = compare_checkpoints([runs["sste"], runs["ste"], runs["dense"]], logdir=tmp_path,
                                 name="cmp")
    run_dirs = sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir())
    assert run_dirs == ["b(ste)_vs_a(sste)", "c(dense)_vs_a(sste)"]  # no A-vs-A run
    acc = read_events(tmp_path / "cmp" / "b(ste)_vs_a(sste)")
    tags = acc.Tags()
    for layer in ("blocks/0/attn/qkv", "blocks/1/mlp/proj"):
        distance = acc.Scalars(f"rel_distance/{layer}")
        assert [e.step for e in distance] == [10, 20]
        expected = [r["rel_distance"] for r in result.rows
                    if r["pair"] == "b(ste)_vs_a(sste)" and r.get("layer") == layer]
        np.testing.assert_allclose([e.value for e in distance], expected, rtol=1e-6)
    assert [e.step for e in acc.Scalars("mask_overlap/blocks/0/mlp/fc")] == [10, 20]
    assert "mask_overlap/blocks/0/attn/qkv" not in tags["scalars"]  # dense in both
    # constant series stay in the table: 2:4 sparsity, the random-mask baseline
    assert not [t for t in tags["scalars"] if t.startswith(("sparsity_", "random_overlap"))]
    assert [e.step for e in acc.Scalars("mean/cosine")] == [10, 20]
    assert "final/a/val_loss" in tags["scalars"] and "final/b/val_loss" in tags["scalars"]
    assert "overview/mask_overlap" in tags["images"] and "overview/cosine" in tags["images"]
    assert [e.step for e in acc.Images("pattern/blocks/0/mlp/fc")] == [10, 20]
    assert "pattern/blocks/0/attn/qkv" not in tags["images"]
    hist = acc.Histograms("nonzero_weights/blocks/0/mlp/fc/b")[-1].histogram_value
    other = acc.Histograms("nonzero_weights/blocks/0/mlp/fc/a")[-1].histogram_value
    assert hist.num == 32 * 128 // 2 and list(hist.bucket_limit) == list(other.bucket_limit)
    text = acc.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("## B = ste vs A = sste")
    assert "| `rules.0.sparsity.method` | sste | ste |" in text
    assert "| layer | rel. distance | cosine | mask IoU | random-mask IoU |" in text
    assert "| `blocks/0/mlp/fc` |" in text and "0.3333" in text
    dense_pair = read_events(tmp_path / "cmp" / "c(dense)_vs_a(sste)")
    assert "pattern/blocks/0/mlp/fc" in dense_pair.Tags()["images"]  # A sparse, C dense


def test_pattern_image_in_tensorboard_counts_the_two_checkpoints_masks(runs, tmp_path):
    compare_checkpoints([runs["sste"], runs["ste"]], logdir=tmp_path, name="cmp")
    acc = read_events(tmp_path / "cmp" / "b(ste)_vs_a(sste)")
    image = png_pixels(acc.Images("pattern/blocks/1/mlp/fc")[0].encoded_image_string)
    a, _, _ = load_model(runs["sste"], 10)
    b, _, _ = load_model(runs["ste"], 10)
    kept_a = np.asarray(a.blocks[1].mlp.fc.effective_kernel())[:64, :32].T != 0
    kept_b = np.asarray(b.blocks[1].mlp.fc.effective_kernel())[:64, :32].T != 0
    assert colour_counts(image) == expected_counts(kept_a, kept_b)


def test_hparams_have_flattened_keys_in_compare_and_training_runs(runs, tmp_path):
    compare_checkpoints([runs["sste"], runs["ste"]], logdir=tmp_path, name="cmp")
    hparams = hparams_of(read_events(tmp_path / "cmp" / "b(ste)_vs_a(sste)"))
    assert hparams["a.rules.0.sparsity.method"] == "sste"
    assert hparams["b.rules.0.sparsity.method"] == "ste"
    assert "a.optimizer.lr" not in hparams  # only the settings that differ
    trained = hparams_of(read_events(runs["sste"]))
    assert trained["rules.0.sparsity.method"] == "sste"
    assert trained["rules.0.sparsity.n"] == 2


def test_overview_figure_has_a_row_per_layer_and_a_column_per_step(runs):
    result = compare_checkpoints([runs["sste"], runs["ste"]])
    fig = result.overview_figure("mask_overlap")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"blocks/{i}/mlp/{p}  (random 0.33)" for i in (0, 1)
                      for p in ("fc", "proj")]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "20"]
    grid = ax.images[0].get_array()
    assert grid.shape == (4, 2)
    assert grid[0, 1] == pytest.approx(layer_rows(result, 20)["blocks/0/mlp/fc"]["mask_overlap"])


def test_an_earlier_comparison_is_replaced_and_other_directories_are_kept(runs, tmp_path):
    compare_checkpoints([runs["sste"], runs["ste"]], logdir=tmp_path, name="cmp")
    compare_checkpoints([runs["sste"], runs["dense"]], logdir=tmp_path, name="cmp")
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()) == [
        "b(dense)_vs_a(sste)"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CompareError, match="not written by sparsejax compare"):
        compare_checkpoints([runs["sste"], runs["ste"]], logdir=tmp_path, name="mine")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_cli_compare_states_where_it_writes(runs, tmp_path, capsys):
    code = main(["compare", str(runs["dense"]), str(runs["sste"]), "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "blocks/1/mlp/proj" in out
    assert f"writing TensorBoard runs to {tmp_path / 'dense_vs_sste'}" in out
    assert f"tensorboard --logdir {tmp_path / 'dense_vs_sste'}" in out
    assert (tmp_path / "dense_vs_sste" / "b(sste)_vs_a(dense)").is_dir()


def test_cli_help_states_the_default_logdir(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "(default: runs/compare)" in capsys.readouterr().out


def test_missing_checkpoint_is_one_line_exit_2(runs, tmp_path, capsys):
    code = main(["compare", str(runs["dense"]), str(tmp_path / "nope"),
                 "--logdir", str(tmp_path / "tb")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "checkpoint not found" in err and "\n" not in err
    assert not (tmp_path / "tb").exists()  # nothing written
    assert main(["compare", str(runs["dense"]), str(runs["dense"]), "--step", "7",
                 "--logdir", str(tmp_path / "tb")]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err


def test_corrupt_checkpoint_is_one_line_exit_2(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs["dense"], broken)
    for f in (broken / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 10)  # truncate the array data
    assert main(["compare", str(runs["dense"]), str(runs["sste"]), "--logdir",
                 str(tmp_path / "tb"), "--name", "cmp"]) == 0
    earlier = sorted(p.name for p in (tmp_path / "tb" / "cmp").iterdir())
    capsys.readouterr()
    code = main(["compare", str(runs["dense"]), str(broken), "--steps", "10,20",
                 "--logdir", str(tmp_path / "tb"), "--name", "cmp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(broken) in err
    # failed at step 20, after step 10 was written: the earlier comparison stays
    assert sorted(p.name for p in (tmp_path / "tb" / "cmp").iterdir()) == earlier
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["cmp"]


def test_compare_needs_two_checkpoints(runs):
    with pytest.raises(CompareError, match="at least two"):
        compare_checkpoints([runs["dense"]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_tensorboard_server_serves_the_comparison(runs, tmp_path):
    result = compare_checkpoints([runs["dense"], runs["sste"]], logdir=tmp_path, name="cmp")
    expected = [(r["step"], r["rel_distance"]) for r in result.rows
                if r.get("layer") == "blocks/0/mlp/fc"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "cmp"),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = urllib.parse.urlencode({"run": "b(sste)_vs_a(dense)",
                                    "tag": "rel_distance/blocks/0/mlp/fc"})
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
    try:
        deadline, data = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.loads(response.read())
                if len(data) == 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        assert data, "tensorboard did not serve the scalar within 90 s"
        assert [(step, pytest.approx(value, rel=1e-6)) for _, step, value in data] == expected
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(),
                    reason="needs Debian's chromium (.ci/run installs it)")
def test_dashboards_show_the_comparison_in_a_real_browser(runs, tmp_path):
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from compare_screenshots import SAVED_WIDTH, take_screenshots

    missing = take_screenshots(tmp_path / "shots", (runs["sste"], runs["ste"]),
                               work=tmp_path / "work")
    assert missing == {"timeseries": [], "custom_scalars": [], "images": [], "text": [],
                       "hparams": []}
    for board in missing:
        shot = np.asarray(Image.open(tmp_path / "shots" / f"{board}.png").convert("RGB"))
        assert shot.shape[1] == SAVED_WIDTH and shot.std() > 10  # a rendered page
