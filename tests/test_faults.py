"""Fault injection on real runs: damaged checkpoints (bytes flipped in each kind of file,
truncated files, a deleted ``state/``), then resume / compare / init_from, and hostile
inputs. Each gives one line naming the checkpoint or key, the documented exit code, and
leaves every good file as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import analog, quant
from sparsejax.checkpoint import Checkpointer
from sparsejax.cli import main
from sparsejax.config import CheckpointError
from sparsejax.errors import NonFiniteLossError
from sparsejax.runs import load_model
from sparsejax.train import run

STEPS = ["train.steps=30", "checkpoint.every=10"]
# A failed Orbax read leaves its async read coroutines and event loop to the garbage
# collector, which reports them; the failure itself is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted tiny GPT run (checkpoints 10, 20, 30), copied per test."""
    from sparsejax.config import load_config
    from tests.conftest import TINY_GPT

    root = tmp_path_factory.mktemp("clean")
    cfg = load_config(None, [*TINY_GPT, *STEPS, f"run_dir={root / 'run'}", "name=tiny"])
    run(cfg, verbose=False)
    return root / "run"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _data_files(step_dir: Path) -> list[Path]:
    """The array data files of a checkpoint, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _flip(path: Path, offset_fraction: float = 0.5, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _params(run_dir: Path):
    model, _, step = load_model(run_dir)
    from flax import nnx
    return nnx.state(model), step


DAMAGE = {
    "flipped bytes in the largest array file": lambda d: _flip(_data_files(d)[0]),
    "flipped bytes in every array file": lambda d: [_flip(p, 0.3) for p in _data_files(d)],
    "truncated array file": lambda d: _data_files(d)[0].write_bytes(
        _data_files(d)[0].read_bytes()[:100]),
    "deleted state directory": lambda d: shutil.rmtree(d / "state"),
    "garbled metadata": lambda d: [p.write_text("{not json") for p in
                                   (d / "state").glob("_METADATA")],
}


QUICK_DAMAGE = {"flipped bytes in the largest array file", "truncated array file",
                "deleted state directory"}  # the other kinds run in `make test-all`


@pytest.mark.parametrize("damage", [
    pytest.param(d, marks=() if d in QUICK_DAMAGE else pytest.mark.slow) for d in DAMAGE])
def test_resume_falls_back_to_the_newest_intact_checkpoint_bitwise(
        finished, tmp_path, tiny_gpt, damage, capsys):
    run_dir = _copy(finished, tmp_path)
    DAMAGE[damage](run_dir / "checkpoints" / "30")
    (run_dir / "results.json").unlink()  # the run lost its end, as after a crash
    results = run(tiny_gpt(*STEPS, run_dir=run_dir), verbose=False)
    assert results["resumed_from"] == 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints/30" in err[0] and "30.corrupt" in err[0], err
    assert (run_dir / "checkpoints" / "30.corrupt").is_dir()  # set aside, not deleted
    chex.assert_trees_all_equal(_params(run_dir)[0], _params(finished)[0])


def test_no_intact_checkpoint_is_one_error_and_renames_nothing(finished, tmp_path, tiny_gpt):
    run_dir = _copy(finished, tmp_path)
    for step in (10, 20, 30):
        _flip(_data_files(run_dir / "checkpoints" / str(step))[0])
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        run(tiny_gpt(*STEPS, run_dir=run_dir), verbose=False)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["flipped bytes in the largest array file",
                                    "deleted state directory"])
def test_compare_and_init_from_name_the_damaged_checkpoint(finished, tmp_path, damage,
                                                          monkeypatch, capsys):
    run_dir = _copy(finished, tmp_path)
    DAMAGE[damage](run_dir / "checkpoints" / "30")
    before = _snapshot(run_dir)
    monkeypatch.chdir(tmp_path)
    for argv in (["compare", str(finished), str(run_dir)],
                 ["train", str(run_dir / "config.yaml"), f"train.init_from={run_dir}",
                  "name=fresh", f"run_dir={tmp_path / 'fresh'}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("sparsejax: checkpoint error: "), err
        assert err.count("\n") == 1 and "checkpoints/30" in err
    assert _snapshot(run_dir) == before
    assert not (tmp_path / "fresh").exists()


def test_rerunning_a_finished_run_keeps_every_field_of_results(finished, tmp_path, tiny_gpt):
    run_dir = _copy(finished, tmp_path)
    first = json.loads((run_dir / "results.json").read_text())
    again = run(tiny_gpt(*STEPS, run_dir=run_dir), verbose=False)
    kept = json.loads((run_dir / "results.json").read_text())
    assert again["resumed_from"] == 30
    for key in ("train_loss", "train_grad_norm", "tokens_per_sec", "compile_seconds"):
        assert kept[key] == first[key] is not None, key
    assert kept["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)


def test_non_finite_evaluation_exits_3_and_leaves_results_alone(finished, tmp_path, tiny_gpt):
    """A checkpoint that is intact but holds NaN weights (saved that way, fingerprints and
    all): re-evaluating it must not replace the run's results."""
    run_dir = _copy(finished, tmp_path)
    ckpt = Checkpointer(run_dir / "checkpoints")
    state, meta = ckpt.restore(30, None)  # raw arrays, fingerprints checked
    leaves, treedef = jax.tree.flatten(state["params"])
    leaves[0] = np.full_like(np.asarray(leaves[0]), np.nan)
    state["params"] = jax.tree.unflatten(treedef, leaves)
    shutil.rmtree(ckpt.step_path(30))
    ckpt.reload()
    ckpt.save(30, state, {k: v for k, v in meta.items() if k != "fingerprints"})
    ckpt.close()
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(NonFiniteLossError, match="non-finite val_loss"):
        run(tiny_gpt(*STEPS, run_dir=run_dir), verbose=False)
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.parametrize("yaml_text, needle", [
    ("model: [1, 2]\n", "bad value for 'model'"),
    ("train: 5\n", "bad value for 'train'"),
    ("optimizer: {lr: .inf}\n", "bad value for 'optimizer.lr'"),
    ("name: ../../escape\n", "bad value for 'name'"),
])
def test_hostile_configs_are_one_line_naming_the_key(yaml_text, needle, tmp_path, monkeypatch,
                                                     capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml_text)
    assert main(["train", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsejax: config error: ") and needle in err, err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("call, needle", [
    (lambda: quant.quantize(jnp.ones((4, 4)), 4, axis=4), "axis=4"),
    (lambda: quant.denoise_quant(jnp.ones((4, 4)), 4, axis=-3), "axis=-3"),
    (lambda: quant.quantize(jnp.ones((0, 4)), 4), "empty"),
    (lambda: analog.adc(jnp.ones(3), 8, bound=0.0), "bound=0.0"),
    (lambda: analog.adc(jnp.ones(3), 8, bound=float("nan")), "bound=nan"),
    (lambda: analog.dac(jnp.ones(3), 1), "bits=1"),
])
def test_api_misuse_raises_value_error_naming_the_argument(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_a_model_too_large_for_memory_is_one_line_with_its_size(tmp_path, monkeypatch, capsys):
    """A 206e9-parameter GPT: the first 64 GiB allocation fails at once (no memory is
    touched); the error is one line with the parameter count, exit 2, nothing written."""
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    argv = ["train", str(REPO / "configs" / "gpt_tiny.yaml"), "model.n_embd=131072",
            "model.n_head=1", "model.n_layer=1", "logging.progress=none"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsejax: out of memory: ") and "206,210,727,936 parameters" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == []
