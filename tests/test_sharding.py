"""Meshes, shardings and multi-host runs (sparsejax.sharding, sparsejax.distributed).

Multi-device behaviour runs in subprocesses: with 8 host devices
(``--xla_force_host_platform_device_count=8``) for the meshes, and as 2 processes on
127.0.0.1 (gloo collectives) for multi-host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from sparsejax.config import ConfigError, MeshConfig
from sparsejax.distributed import initialize, slurm_world
from sparsejax.runs import init_model, load_model
from sparsejax.sharding import (
    MESH_AXES,
    check_transform_sharding,
    logical_axes,
    mesh_shape,
    spec_for,
)
from sparsejax.train import run
from tests.conftest import REPO, TINY_GPT


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


@pytest.mark.parametrize("cfg, devices, shape", [
    (MeshConfig(), 8, (8, 1, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=1, fsdp=1, tensor=1), 8, (1, 1, 1)),  # explicit sizes may use fewer
])
def test_mesh_shape_resolves_the_free_axis(cfg, devices, shape):
    assert mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize("cfg, needle", [
    (MeshConfig(data=3, fsdp=-1), "'mesh.fsdp'"),
    (MeshConfig(data=4, fsdp=4), "data*fsdp*tensor = 16 but only 8 device"),
])
def test_mesh_that_does_not_fit_the_devices_is_refused(cfg, needle):
    with pytest.raises(ConfigError, match=needle.replace("*", r"\*")):
        mesh_shape(cfg, 8)


def test_batch_must_divide_over_data_and_fsdp(tiny_gpt):
    with pytest.raises(ConfigError, match="'data.batch_size': 8 is not divisible by mesh.data "
                       r"\* mesh.fsdp = 6"):
        tiny_gpt("mesh.data=3", "mesh.fsdp=2")
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        tiny_gpt("mesh.fsdp=-1")


def test_partition_specs_follow_the_logical_axes_of_the_parameters(tiny_gpt):
    model = init_model(tiny_gpt("rules=[{path: 'blocks/\\d+/.*', sparsity: {method: maskllm}}]"))
    axes = logical_axes(model)  # declared where the model creates its parameters
    assert axes["blocks/0/attn/qkv/kernel"] == ("embed", "heads")
    assert axes["wte/embedding"] == ("vocab", "embed")
    mesh = abstract_mesh(2, 2, 2)
    assert spec_for("blocks/0/attn/qkv/kernel", (32, 96), mesh, axes) == \
        PartitionSpec("fsdp", "tensor")
    assert spec_for("blocks/1/mlp/proj/kernel", (128, 32), mesh, axes) == \
        PartitionSpec("tensor", "fsdp")
    # optimiser moments end in their parameter's path
    assert spec_for("opt_state/0/mu/blocks/1/mlp/fc/bias", (128,), mesh, axes) == \
        PartitionSpec("tensor")
    assert spec_for("blocks/0/ln_1/scale", (32,), mesh, axes) == PartitionSpec()
    assert spec_for("0/count", (), mesh, axes) == PartitionSpec()
    # MaskLLM logits (out, in // 4, 6) follow their kernel (in, out), candidates unsplit:
    # the transform declares it, not the sharding module
    assert spec_for("blocks/1/mlp/proj/sparsity/params/mask_logits", (32, 32, 6), mesh,
                    axes) == PartitionSpec("fsdp", "tensor", None)
    assert spec_for("blocks/0/attn/qkv/sparsity/params/mask_logits", (96, 8, 6), mesh,
                    axes) == PartitionSpec("tensor", "fsdp", None)
    # size-1 mesh axes are dropped: pure data parallelism replicates every parameter
    assert spec_for("blocks/0/attn/qkv/kernel", (32, 96), abstract_mesh(8, 1, 1), axes) == \
        PartitionSpec(None, None)


def test_dimension_that_does_not_divide_names_parameter_and_mesh_axis():
    axes = {"blocks/0/mlp/fc/kernel": ("embed", "mlp")}
    with pytest.raises(ConfigError, match="'mesh.tensor': blocks/0/mlp/fc/kernel has 96 along "
                       "axis 1 .mlp., not divisible by mesh.tensor=5"):
        spec_for("blocks/0/mlp/fc/kernel", (32, 96), abstract_mesh(1, 1, 5), axes)


@pytest.mark.parametrize("rule, mesh, needle", [
    # attn/proj has in=32 sharded over tensor: 8 ways -> 4 rows, fine for 2:4 ...
    ("{sparsity: {method: sste, n: 2, m: 4}}", (1, 1, 8), None),
    # ... but 4 rows cannot hold whole 32-row quantisation blocks
    ("{quant: {weights: {method: dat, bits: 4, block_size: 32}}}", (1, 1, 8),
     r"'mesh.tensor': layer blocks/0/attn/proj would split its weight quantisation blocks "
     r"\(block_size=32\) across devices: axis 0 \(in=32\) is sharded 8 ways over mesh axis "
     r"'tensor' \(4 rows each\)"),
    # qkv / fc have in=32 sharded over fsdp: 32 / 8 = 4 rows, a 4:8 group needs 8
    ("{sparsity: {method: sste, n: 4, m: 8}}", (1, 8, 1),
     r"layer blocks/0/attn/qkv would split its N:M groups \(m=8\)"),
])
def test_mesh_that_splits_an_nm_group_or_quant_block_is_refused(tiny_gpt, rule, mesh, needle):
    cfg = tiny_gpt(f"rules=[{{path: 'blocks/\\d+/.*', {rule[1:-1]}}}]", "data.batch_size=8")
    model = init_model(cfg)
    if needle is None:
        check_transform_sharding(model, abstract_mesh(*mesh))
    else:
        with pytest.raises(ConfigError, match=needle):
            check_transform_sharding(model, abstract_mesh(*mesh))


def test_slurm_world_comes_from_the_allocation():
    assert slurm_world({}) is None
    assert slurm_world({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert slurm_world({"SLURM_JOB_ID": "1", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (4, 3)


def test_partial_multi_host_flags_are_refused():
    with pytest.raises(ValueError, match="go together"):
        initialize("127.0.0.1:1234", None, 0)
    assert initialize() is False  # neither flags nor SLURM: a single-process run


_IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sparsejax
from jax._src import xla_bridge
for info in pkgutil.walk_packages(sparsejax.__path__, "sparsejax."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
        if xla_bridge._backends:
            raise SystemExit("importing " + info.name + " started the XLA backend")
"""


def test_importing_the_library_does_not_start_the_backend():
    # jax.distributed.initialize must run before any JAX computation; a jnp constant
    # at module level (once in numerics/lmul.py) broke every multi-process launch.
    done = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_MODULE], cwd=REPO,
                          env=_env(1), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.sharded_runs", str(root)],
                          cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The sharded runs (one module fixture, ~2.5 min on 2 cores) run in `make test-all`.
@pytest.mark.slow
@pytest.mark.parametrize("rules", ["dense", "sste"])
@pytest.mark.parametrize("mesh", ["8,1,1", "2,4,1", "2,2,2"])
def test_loss_after_20_steps_on_a_mesh_equals_the_single_device_run(sharded, rules, mesh):
    assert sharded["devices"] == 8
    single = sharded["loss"][f"{rules} 1,1,1"]
    np.testing.assert_allclose(sharded["loss"][f"{rules} {mesh}"], single, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rules", ["quant", "analog", "maskllm"])
def test_quantised_analog_and_maskllm_rules_train_alike_on_a_2x2x2_mesh(sharded, rules):
    # Quantisation rounds: a last-bit difference in a block statistic (another reduction
    # order on the mesh) can move a value across a rounding boundary, so quantised runs
    # agree to ~1e-4 after 20 steps instead of to the last bits.
    atol = 1e-3 if rules == "quant" else 1e-5
    np.testing.assert_allclose(sharded["loss"][f"{rules} 2,2,2"],
                               sharded["loss"][f"{rules} 1,1,1"], rtol=0, atol=atol)
    assert sharded["loss"][f"{rules} 1,1,1"] != sharded["loss"]["dense 1,1,1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["8to1", "1to4"])
def test_checkpoint_restores_on_another_mesh_and_continues_identically(sharded, name):
    result = sharded[name]
    assert result["resumed_from"] == 10
    assert result["val_loss"] == pytest.approx(sharded["loss"]["sste 1,1,1"][1], abs=1e-5)
    assert result["max_param_diff"] < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_match_the_single_process_run(tmp_path, tiny_gpt):
    overrides = [*TINY_GPT, "train.steps=8", "checkpoint.every=4", "name=mp",
                 f"run_dir={tmp_path / 'multi'}"]
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "sparsejax", "train", "configs/gpt_tiny.yaml", *overrides,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    multi = json.loads((tmp_path / "multi" / "results.json").read_text())
    single = run(tiny_gpt("train.steps=8", "checkpoint.every=4",
                          run_dir=tmp_path / "single"), verbose=False)
    assert multi["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    assert multi["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    a, _, _ = load_model(tmp_path / "multi")
    b, _, _ = load_model(tmp_path / "single")
    import chex
    from flax import nnx

    chex.assert_trees_all_close(nnx.state(a, nnx.Param), nnx.state(b, nnx.Param), atol=1e-5)
    # process 0 alone wrote the event files; the config is the run's
    assert len(list((tmp_path / "multi").glob("events.out.tfevents.*"))) == 1
