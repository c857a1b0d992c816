"""Hugging Face checkpoints in, checked against ``transformers`` itself: tiny random
``llama`` (grouped-query, llama3 rotary scaling), ``qwen2`` (q/k/v biases, tied head),
``mistral`` and ``gpt2`` models saved by ``transformers`` load through
``sparsejax.runs.load_model`` and give its logits within 1e-4.

The default suite reads the golden directories ``tests/data/hf/`` (written by
``tests/data/make_hf_golden.py`` with transformers), so it needs no PyTorch; the tests
marked ``transformers`` build fresh models (sharded and bfloat16 checkpoints too) and are
skipped, with the reason shown, where transformers is not installed (``.ci/run`` installs
it)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sparsejax.errors import ConfigError
from sparsejax.hf import is_hf_dir
from sparsejax.runs import load_model
from tests.conftest import REPO

GOLDEN = REPO / "tests/data/hf"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
needs_transformers = pytest.mark.skipif(
    not HAVE_TRANSFORMERS, reason="needs torch and transformers (pip install torch==2.13.0 "
    "transformers; .ci/run installs them)")


@pytest.fixture
def transformers_module():
    """``transformers``, imported with this checkout's root off ``sys.path``: its optional
    "kernels" integration would otherwise find our ``kernels/`` directory (installed as
    ``sparsejax.kernels``) as a top-level ``kernels`` package."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        import transformers
        import transformers.integrations.hub_kernels  # noqa: F401 (decides it here)
    finally:
        sys.path[:] = saved
    return transformers


def _logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    model, cfg, step = load_model(directory)
    assert step == 0 and is_hf_dir(directory)
    model.eval()
    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def test_the_golden_directories_cover_every_supported_model_type():
    from sparsejax.models import hf_model_types

    types = {json.loads((GOLDEN / c / "config.json").read_text())["model_type"] for c in CASES}
    assert types == set(hf_model_types())


@pytest.mark.parametrize("case", CASES)
def test_a_saved_transformers_model_gives_its_logits(case):
    reference = np.load(GOLDEN / case / "reference.npz")
    got = _logits(GOLDEN / case, reference["ids"])
    np.testing.assert_allclose(got, reference["logits"], rtol=1e-4, atol=1e-4)


def _copy(case: str, tmp_path: Path) -> Path:
    out = tmp_path / case
    shutil.copytree(GOLDEN / case, out)
    return out


def test_an_unsupported_model_type_is_one_line_naming_it_and_the_supported(tmp_path):
    directory = _copy("gpt2", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not supported; supported: "
                                          r"gpt2, llama, mistral, qwen2"):
        load_model(directory)
    done = subprocess.run([sys.executable, "-m", "sparsejax", "sample", str(directory)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "bert" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_field_a_missing_tensor_and_a_wrong_shape_are_named(tmp_path):
    directory = _copy("llama_gqa", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["num_hidden_layers"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="needs the field num_hidden_layers"):
        load_model(directory)
    directory = _copy("qwen2_bias_tied", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != name}, directory / "model.safetensors")
    with pytest.raises(ConfigError, match=f"tensor {name} is missing"):
        load_model(directory)
    tensors[name] = np.zeros(3, tensors[name].dtype)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"tensor {name} has shape \(3,\), the model needs "
                                          r"\(16,\)"):
        load_model(directory)


def test_an_index_naming_a_missing_shard_is_named(tmp_path):
    directory = _copy("gpt2", tmp_path)
    names = list(load_file(directory / "model.safetensors"))
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}}))
    with pytest.raises(ConfigError, match="names model-00002-of-00002.safetensors, which"):
        load_model(directory)


@needs_transformers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fresh_sharded_checkpoints_load_in_any_float_dtype(dtype, tmp_path,
                                                          transformers_module):
    import torch

    AutoModelForCausalLM = transformers_module.AutoModelForCausalLM
    sys.path.insert(0, str(GOLDEN.parent))
    from make_hf_golden import IDS, configs

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(configs()["llama_gqa"]).eval()
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "m", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    with torch.no_grad():  # the reference runs on the stored weights, in float32
        expected = model.float()(torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(_logits(tmp_path / "m", IDS), expected, rtol=1e-4, atol=1e-4)


@needs_transformers
@pytest.mark.parametrize("case", CASES)
def test_the_golden_files_are_what_transformers_writes_now(case, tmp_path,
                                                          transformers_module):
    sys.path.insert(0, str(GOLDEN.parent))
    from make_hf_golden import IDS, configs, save

    logits = save(case, configs()[case], tmp_path / case)
    np.testing.assert_allclose(_logits(tmp_path / case, IDS), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2_bias_tied", "gpt2"])
def test_import_export_import_is_bitwise(case, tmp_path):
    from sparsejax.export import export_run

    first, _, _ = load_model(GOLDEN / case)
    export_run(GOLDEN / case, tmp_path / "out")
    second, _, _ = load_model(tmp_path / "out")
    from flax import nnx

    for a, b in zip(jax_leaves(nnx.state(first, nnx.Param)),
                    jax_leaves(nnx.state(second, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax

    return [v for _, v in sorted(jax.tree_util.tree_leaves_with_path(tree),
                                 key=lambda t: jax.tree_util.keystr(t[0]))]


def test_export_refuses_an_existing_out_and_an_unrepresentable_model(tmp_path, tiny_gpt):
    from sparsejax.export import export_run
    from sparsejax.train import run

    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="--out .*taken exists"):
        export_run(GOLDEN / "gpt2", tmp_path / "taken")
    cfg = tiny_gpt("train.steps=2", "rules=[{path: 'blocks/\\d+/attn', attention: "
                   "{method: gaincell, calib_batches: 0}}]")
    run(cfg, verbose=False)
    with pytest.raises(ConfigError, match="blocks/0/attn carries attention 'gaincell'"):
        export_run(cfg.run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@needs_transformers
@pytest.mark.parametrize("family, rule", [
    ("llama", "rules=[{path: 'layers/\\d+/mlp/(gate|up|down)', sparsity: {method: sste}}]"),
    ("gpt", "rules=[{path: 'blocks/\\d+/mlp/(fc|proj)', sparsity: {method: maskllm}}]"),
    ("llama", "rules=[{path: 'layers/\\d+/attn/(q|k|v|o)', quant: {weights: {method: dat, "
              "bits: 4}}}]"),
])
def test_an_exported_run_loads_in_transformers_with_the_same_logits(family, rule, tmp_path,
                                                                      tiny_gpt,
                                                                      transformers_module):
    import torch

    AutoModelForCausalLM = transformers_module.AutoModelForCausalLM
    from sparsejax.export import export_run
    from sparsejax.train import run

    cfg = tiny_gpt(f"model.kind={family}", "train.steps=4", rule)
    run(cfg, verbose=False)
    export_run(cfg.run_dir, tmp_path / "hf")
    model, _, _ = load_model(cfg.run_dir)
    model.eval()
    ids = np.random.default_rng(4).integers(0, 256, (2, 16))
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = theirs(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ours, rtol=1e-4, atol=1e-4)
    if "sste" in rule:  # 2:4 stays 2:4 in the exported dense tensors
        w = theirs.model.layers[0].mlp.up_proj.weight.detach().numpy()  # (out, in)
        nonzero = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert nonzero.max() <= 2


def test_sample_and_evaluate_need_the_hf_tokenizer_and_say_so(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    for command in (["sample", str(GOLDEN / "gpt2")],
                    ["evaluate", str(GOLDEN / "gpt2"), "--data", str(text)]):
        done = subprocess.run([sys.executable, "-m", "sparsejax", *command],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "has no tokenizer.json" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_an_hf_model_is_pruned_on_calibration_text_and_exported(tmp_path):
    from sparsejax.corpus import train_bpe
    from sparsejax.export import export_run
    from sparsejax.posttrain import prune_run

    directory = _copy("llama_gqa", tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text("the pruned model is calibrated on text like this line\n" * 200)
    train_bpe([text], 300).hf.save(str(directory / "tokenizer.json"))
    report = prune_run(directory, tmp_path / "pruned", method="wanda", nm=(2, 4),
                       calib_data=text, calib_batches=2, calib_seq_len=16, progress=None)
    assert report["pattern"] == "2:4" and report["density"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="--calib-data .* tokens; 200 batches"):
        prune_run(directory, tmp_path / "more", method="wanda", nm=(2, 4), calib_data=text,
                  calib_batches=200, calib_seq_len=64, progress=None)
    export_run(tmp_path / "pruned", tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    w = exported["model.layers.0.mlp.up_proj.weight"]  # (out, in): 2 of every 4 inputs
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
