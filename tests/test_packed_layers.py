"""The packed 2:4 kernel inside the model: training with ``kernel: pallas`` (interpret mode
here) matches the masked-dense path, ``pack_model`` gives the same outputs from packed
weights, and its sparse layers hold 9/16 of the dense bf16 bytes (Orbax files: ~0.78,
since compression shrinks the dense zeros)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sparsejax.config import ConfigError
from sparsejax.nn import Linear, pack_model, sparse_layers
from sparsejax.runs import init_model, load_model
from sparsejax.train import run
from sparsejax.transforms.sparsity import STE

FFN = "blocks/\\d+/mlp/(fc|proj)"


def rule(method: str = "sste", kernel: str = "xla", n: int = 2, m: int = 4) -> str:
    return (f"rules=[{{path: '{FFN}', sparsity: {{method: {method}, n: {n}, m: {m}, "
            f"kernel: {kernel}}}}}]")


@pytest.mark.slow
def test_pallas_kernel_training_matches_the_masked_dense_path(tiny_gpt, tmp_path):
    losses = {}
    for kernel in ("xla", "pallas"):
        cfg = tiny_gpt(rule("sste", kernel), "train.steps=6", "train.eval_every=6",
                       run_dir=tmp_path / kernel)
        losses[kernel] = run(cfg, verbose=False)["val_loss"]
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-4)
    a, _, _ = load_model(tmp_path / "xla")
    b, _, _ = load_model(tmp_path / "pallas")
    for (path, la), (_, lb) in zip(sparse_layers(a), sparse_layers(b), strict=True):
        np.testing.assert_allclose(la.kernel[...], lb.kernel[...], atol=2e-5, err_msg=path)


def test_pallas_kernel_needs_m_at_most_4(tiny_gpt):
    with pytest.raises(ConfigError, match="rules.0.sparsity.kernel.*m <= 4"):
        tiny_gpt(rule("sste", "pallas", 4, 8))


@pytest.mark.parametrize("dtype, tol", [(None, 1e-5), (jnp.bfloat16, 5e-2)])
def test_packed_model_gives_the_same_outputs(tiny_gpt, dtype, tol):
    model = init_model(tiny_gpt(rule("ste"), "model.n_embd=128"))
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    before = model(ids)
    packed = pack_model(model, dtype)
    assert packed == ["blocks/0/mlp/fc", "blocks/0/mlp/proj", "blocks/1/mlp/fc",
                      "blocks/1/mlp/proj"]
    for path, layer in sparse_layers(model):
        assert layer.packed is not None and layer.kernel is None, path
    after = model(ids)
    np.testing.assert_allclose(after, before, atol=tol * float(jnp.max(jnp.abs(before))))


def test_layer_too_small_to_gain_stays_dense():
    layer = Linear(8, 4, rngs=nnx.Rngs(0))  # 2 groups padded to 32: packing would grow it
    layer.configure({"sparsity": STE()})
    assert pack_model(layer) == [] and layer.kernel is not None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_packed_checkpoint_is_about_9_16_of_the_dense(tiny_gpt, tmp_path):
    model = init_model(tiny_gpt(rule("sste"), "model.n_embd=256", "model.n_layer=1"))
    ffn = {path: layer for path, layer in sparse_layers(model)}
    dense = {path: layer.effective_kernel().astype(jnp.bfloat16) for path, layer in ffn.items()}
    pack_model(model, jnp.bfloat16)
    packed = {path: {"values": layer.packed_values[...], "meta": layer.packed_meta[...]}
              for path, layer in ffn.items()}
    checkpointer = ocp.StandardCheckpointer()
    for name, tree in (("dense", dense), ("packed", packed)):
        checkpointer.save(tmp_path / name, {k.replace("/", "."): v for k, v in tree.items()})
    checkpointer.wait_until_finished()
    nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))
    np.testing.assert_allclose(nbytes(packed) / nbytes(dense), 9 / 16, rtol=1e-6)
    # On disk Orbax compresses (zstd): the dense file's zeros shrink more than the packed
    # values do, so the file ratio is higher than 9/16 (0.78 measured) - still a saving.
    ratio = _dir_bytes(tmp_path / "packed") / _dir_bytes(tmp_path / "dense")
    assert ratio < 0.85, ratio
    restored = checkpointer.restore(tmp_path / "packed")
    np.testing.assert_array_equal(restored["blocks.0.mlp.fc"]["meta"],
                                  packed["blocks/0/mlp/fc"]["meta"])
