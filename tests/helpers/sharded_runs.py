"""Run by tests/test_sharding.py in a subprocess with 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): trains the tiny GPT for 20 steps
on several meshes, dense and with an S-STE rule (quantised, analog and MaskLLM rules on one
mesh), resumes a run saved on 8 devices on 1 and one saved on 1 device on 4; prints one
JSON object of losses and parameter differences."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sparsejax.config import load_config
from sparsejax.runs import load_model
from sparsejax.train import run
from tests.conftest import TINY_GPT

SSTE = "rules=[{path: 'blocks/\\d+/mlp/(fc|proj)', sparsity: {method: sste}}]"
QUANT = ("rules=[{path: 'blocks/\\d+/.*', quant: {weights: {method: dat, bits: 4, "
         "block_size: 16}, activations: {method: dat, bits: 4, block_size: 16}}}]")
ANALOG = ("rules=[{path: 'blocks/\\d+/(attn|mlp)/.*', analog: {weight_noise: 0.06, "
          "act_noise: 0.1}}]")
MASKLLM = "rules=[{path: 'blocks/\\d+/(attn|mlp)/.*', sparsity: {method: maskllm}}]"
MESHES = {"1,1,1": (1, 1, 1), "8,1,1": (8, 1, 1), "2,4,1": (2, 4, 1), "2,2,2": (2, 2, 2)}


def config(root: Path, name: str, mesh: tuple[int, int, int], *extra: str):
    d, f, t = mesh
    return load_config(None, [*TINY_GPT, f"run_dir={root / name}", "name=tiny", "train.steps=20",
                              f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", *extra])


def max_param_diff(a: Path, b: Path) -> float:
    ma, _, _ = load_model(a)
    mb, _, _ = load_model(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(nnx.state(ma, nnx.Param)),
                               jax.tree.leaves(nnx.state(mb, nnx.Param)), strict=True))


def main(root: Path) -> None:
    out: dict = {"devices": jax.device_count(), "loss": {}}
    for rules_name, rules in (("dense", "rules=[]"), ("sste", SSTE)):
        for mesh_name, mesh in MESHES.items():
            res = run(config(root, f"{rules_name}_{mesh_name}", mesh, rules), verbose=False)
            out["loss"][f"{rules_name} {mesh_name}"] = [res["train_loss"], res["val_loss"]]
    for rules_name, rules in (("quant", QUANT), ("analog", ANALOG), ("maskllm", MASKLLM)):
        for mesh_name in ("1,1,1", "2,2,2"):
            res = run(config(root, f"{rules_name}_{mesh_name}", MESHES[mesh_name], rules),
                      verbose=False)
            out["loss"][f"{rules_name} {mesh_name}"] = [res["train_loss"], res["val_loss"]]
    # Saved on 8 devices (2,2,2), resumed on 1 from step 10; and saved on 1, resumed on 4.
    for name, saved, resumed in (("8to1", (2, 2, 2), (1, 1, 1)), ("1to4", (1, 1, 1), (2, 1, 2))):
        extra = (SSTE, "checkpoint.every=10")
        run(config(root, name, saved, *extra), verbose=False)
        shutil.rmtree(root / name / "checkpoints" / "20")
        (root / name / "results.json").unlink()
        res = run(config(root, name, resumed, *extra), verbose=False)
        out[name] = {"resumed_from": res["resumed_from"], "val_loss": res["val_loss"],
                     "max_param_diff": max_param_diff(root / name, root / "sste_1,1,1")}
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
