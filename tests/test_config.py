"""Config errors are one line naming the key; the CLI exits 2 and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparsejax.cli import build_configs, main
from sparsejax.config import ConfigError, DataSource, config_diff, load_config
from tests.conftest import REPO

GPT_TINY = str(REPO / "configs" / "gpt_tiny.yaml")


def test_yaml_and_overrides_merge_with_types():
    cfg = load_config(GPT_TINY, ["train.steps=200", "optimizer.lr=3e-4", "model.dropout=0.1"])
    assert cfg.name == "gpt_tiny"
    assert cfg.train.steps == 200 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.kind == "gpt" and cfg.data.source == DataSource.stdlib


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lrr=1e-3", "unknown key 'optimizer.lrr'"),
    ("optimizer.lrr=1e-3", "did you mean 'optimizer.lr'"),
    ("trian.steps=3", "did you mean 'train.steps'"),
    ("train.steps=abc", "'train.steps' in overrides: Value 'abc'"),
    ("model.kind=transformer", "'transformer' is not one of gpt|"),
    ("model.n_embd=30", "'model.n_embd': 30 is not divisible by model.n_head=4"),
    ("data.source=text", "'data.path'"),
    ("data.source=digits", "model.kind=gpt needs a token source"),
    ("train.steps=0", "'train.steps': must be > 0"),
    ("rules=[{path: '(['}]", "'rules.0.path'"),
    ("rules=[{path: '.*', sparsity: {method: topk}}]", "'rules.0.sparsity.method'"),
    ("rules=[{path: '.*', sparsity: {n: 4, m: 4}}]", "'rules.0.sparsity.n'"),
    ("rules=[{path: '.*', sparsity: {nn: 4}}]", "rules"),
    ("train.steps", "expected key=value"),
])
def test_bad_override_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(GPT_TINY, [override])
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layr: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_layr' in .*bad.yaml.*n_layer"):
        load_config(bad)


def test_missing_config_file_is_reported():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("argv", [
    ["train", "missing.yaml"],
    ["train", GPT_TINY, "optimizer.lrr=1"],
    ["train", GPT_TINY, "train.steps=many"],
    ["train", GPT_TINY, "--sweep", "optimizer.lr"],
    ["train", GPT_TINY, "--sweep", "optimizer.lrx=1,2"],
])
def test_cli_config_error_exits_2_with_one_line_and_writes_nothing(
        argv, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsejax: config error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["compare", "runs/missing_a", "runs/missing_b"],
    ["train", GPT_TINY, "train.init_from=runs/missing", "train.steps=2",
     "optimizer.warmup_steps=1"],
    ["evaluate-analog", "runs/missing"],
])
def test_cli_missing_checkpoint_is_a_checkpoint_error_not_a_config_error(
        argv, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsejax: checkpoint error: ") and "runs/missing" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_sweep_is_a_cartesian_product_under_one_parent():
    configs = build_configs(GPT_TINY, ["train.steps=5", "optimizer.warmup_steps=1"],
                            ["optimizer.lr=1e-3,2e-3", "train.seed=0,1,2"])
    assert len(configs) == 6
    assert {c.run_dir for c in configs} == {
        os.path.join("runs", "gpt_tiny", f"lr={lr},seed={s}")
        for lr in ("1e-3", "2e-3") for s in (0, 1, 2)}
    assert sorted((c.optimizer.lr, c.train.seed) for c in configs)[0] == (1e-3, 0)
    assert all(c.train.steps == 5 for c in configs)


def test_config_diff_lists_changed_keys():
    a = load_config(GPT_TINY)
    b = load_config(GPT_TINY, ["optimizer.lr=1e-4", "model.hidden=[8]"])
    assert config_diff(a, b) == ["model.hidden", "optimizer.lr"]


def test_every_shipped_config_loads_and_starts_with_its_command():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        text = path.read_text().splitlines()
        assert text[0].startswith("# Run:") and "sparsejax train" in text[0], path
        assert any(line.startswith("# Expect:") for line in text[:4]), path
        cwd = os.getcwd()
        try:
            os.chdir(REPO)
            load_config(path)
        finally:
            os.chdir(cwd)
