"""The trainer end to end: learning, TensorBoard, checkpoints, resume after kill -9, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from sparsejax.checkpoint import Checkpointer
from sparsejax.cli import main
from sparsejax.errors import NonFiniteLossError
from sparsejax.train import run
from tests.conftest import REPO, TINY_GPT


def _restore_raw(run_dir: Path, step: int):
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    state, meta = ckpt.restore(step, None)
    ckpt.close()
    return state, meta


def test_gpt_learns_and_writes_a_complete_run_dir(tiny_gpt, tmp_path):
    results = run(tiny_gpt("train.steps=60", "train.eval_every=20"), verbose=False)
    run_dir = tmp_path / "run"
    assert results["val_bpb"] < results["unigram_entropy_bpb"] < math.log2(256)
    assert results["train_loss"] < math.log(256) - 1.0
    assert results["params"] == sum(x.size for x in jax.tree.leaves(_restore_raw(
        run_dir, 60)[0]["params"]))
    assert json.loads((run_dir / "results.json").read_text())["val_bpb"] == results["val_bpb"]
    assert (run_dir / "config.yaml").read_text().startswith("name: tiny")
    assert Checkpointer(run_dir / "checkpoints", read_only=True).all_steps() == [40, 50, 60]


def test_tensorboard_events_read_back_with_tensorboards_reader(tiny_gpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run(tiny_gpt(), verbose=False)
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/bpb", "train/lr", "train/grad_norm", "val/loss",
                "val/bpb", "throughput/tokens_per_sec"):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
    assert [e.step for e in acc.Scalars("val/bpb")] == [10, 20, 30]
    lr = [e.value for e in acc.Scalars("train/lr")]
    # The lr logged at step s is the one the s-th update used: warm-up 4/5 of the peak.
    assert lr[0] == pytest.approx(3e-3 * 4 / 5, rel=1e-5)
    assert lr[-1] < lr[1] and lr[-1] >= 3e-4
    assert "config/text_summary" in acc.Tags()["tensors"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_embd: 32" in config_text
    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["model.kind"].string_value == "gpt"


def test_mlp_on_digits_reaches_high_accuracy(tiny_mlp):
    results = run(tiny_mlp("train.steps=200", "optimizer.warmup_steps=20"), verbose=False)
    assert results["val_accuracy"] > 0.9 > results["majority_class_accuracy"]


def test_rerun_of_finished_run_resumes_without_training(tiny_gpt):
    first = run(tiny_gpt(), verbose=False)
    again = run(tiny_gpt(), verbose=False)
    assert again["resumed_from"] == 30
    assert again["val_loss"] == first["val_loss"]


def test_run_dir_with_different_config_is_refused_untouched(tiny_gpt, tmp_path, capsys,
                                                             monkeypatch):
    run(tiny_gpt(), verbose=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    monkeypatch.chdir(REPO)
    argv = ["train", "configs/gpt_tiny.yaml", *TINY_GPT, f"run_dir={tmp_path / 'run'}",
            "name=tiny", "optimizer.lr=1e-4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (optimizer.lr: 0.003 -> 0.0001" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_foreign_directory_is_not_used_as_run_dir(tiny_gpt, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(Exception, match="is not a sparsejax run directory"):
        run(tiny_gpt(run_dir=tmp_path / "mine"), verbose=False)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_mlp, tmp_path):
    cfg = tiny_mlp("optimizer.lr=1e30", "optimizer.grad_clip=0", "optimizer.warmup_steps=3",
                   "checkpoint.every=1", "logging.log_every=1")
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*Last good checkpoint: step"
                       ) as info:
        run(cfg, verbose=False)
    bad_step = int(str(info.value).split("at step ")[1].split()[0])
    steps = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).all_steps()
    assert steps and max(steps) == bad_step - 1
    state, _ = _restore_raw(tmp_path / "run", max(steps))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_cli_exits_3_on_divergence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(REPO / "configs" / "mlp_digits.yaml"), "optimizer.lr=1e30",
            "optimizer.grad_clip=0", "optimizer.warmup_steps=1", "logging.progress=none",
            "train.steps=20"]
    assert main(argv) == 3
    assert "non-finite loss" in capsys.readouterr().err


def test_cli_sweep_runs_each_variant_in_its_own_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", str(REPO / "configs" / "mlp_digits.yaml"), "train.steps=10",
            "optimizer.warmup_steps=2", "logging.progress=none", "--sweep", "train.seed=0,1"]
    assert main(argv) == 0
    for seed in (0, 1):
        run_dir = tmp_path / "runs" / "mlp_digits" / f"seed={seed}"
        assert f"seed: {seed}" in (run_dir / "config.yaml").read_text()
        assert (run_dir / "results.json").is_file()
    assert "sweep summary" in capsys.readouterr().out


# --------------------------------------------------------------------------- kill -9


def _train_cmd(run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "sparsejax", "train", "configs/gpt_tiny.yaml", *TINY_GPT,
            f"train.steps={steps}", "checkpoint.every=10", "checkpoint.keep=2",
            "train.eval_every=1000", "model.dropout=0.1", f"run_dir={run_dir}"]


def _committed_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


def clean_and_killed_runs(command: Callable[[Path], list[str]], tmp_path: Path,
                          kill_after: int = 30) -> tuple[Path, Path]:
    """Run ``command(run_dir)`` to the end in ``tmp_path/clean``; in ``tmp_path/killed``,
    kill -9 it once a checkpoint at step >= ``kill_after`` is committed, then run it again
    (a resume). Returns both run directories."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(command(clean), cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=600)
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= kill_after
                                             for s in _committed_steps(killed)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it was killed"
    subprocess.run(command(killed), cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=600)
    return clean, killed


@pytest.mark.slow
def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    steps = 400
    clean, killed = clean_and_killed_runs(lambda run_dir: _train_cmd(run_dir, steps), tmp_path)
    resumed = json.loads((killed / "results.json").read_text())
    assert 30 <= resumed["resumed_from"] < steps

    a, meta_a = _restore_raw(clean, steps)
    b, meta_b = _restore_raw(killed, steps)
    timing = ("loop_seconds",)
    assert {k: v for k, v in meta_a.items() if k not in timing} == {
        k: v for k, v in meta_b.items() if k not in timing}
    assert len(jax.tree.leaves(a)) > 10
    chex.assert_trees_all_equal(a, b)
    assert json.loads((clean / "results.json").read_text())["val_loss"] == resumed["val_loss"]


KILL_DURING_SAVE = r"""
import os, signal, sys
import numpy as np
from sparsejax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=3, async_save=True)
ckpt.save(5, {"w": np.full((4,), 5.0, np.float32)}, {"step": 5})
ckpt.wait()
big = np.random.default_rng(0).standard_normal((64, 1024, 1024)).astype(np.float32)
ckpt.save(10, {"w": big}, {"step": 10})
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path / "ck")],
                          env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.latest_step() == 5
    state, meta = ckpt.restore(5, {"w": np.zeros((4,), np.float32)})
    np.testing.assert_array_equal(state["w"], np.full((4,), 5.0))
    assert meta["step"] == 5 and set(meta) == {"step", "fingerprints"}
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "ck")) == ["5"]  # the partial save was cleaned up


def test_warmup_longer_than_the_run_is_cut_to_the_run():
    from sparsejax.config import OptimizerConfig
    from sparsejax.optim import make_optimizer

    _, schedule = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=50), total_steps=20)
    lrs = [float(schedule(s)) for s in range(20)]
    assert lrs[0] == 0.0 and all(np.isfinite(lrs))
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 19
