"""Every registered method of every declared kind, generated from the registry (a new method
is tested without anyone editing a list): built from its defaults (or the minimal block its
class declares as ``example_block``), configured on each layer type its block takes in every
model family, applied with and without ``jit`` to the same numbers, and its params and state
checkpointed and restored bitwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.checkpoint import Checkpointer
from sparsejax.config import load_config
from sparsejax.nn import apply_rules, transform_slots
from sparsejax.tasks import build_model
from sparsejax.transforms import methods, rule_blocks, spec_class
from sparsejax.transforms.kinds import block_for_key
from tests.conftest import TINY_GPT

# A layer of each type in each model family (module paths of the family's docstring).
FAMILIES = {"gpt": {"linear": "blocks/0/mlp/fc", "activation": "blocks/0/mlp/act",
                    "attention": "blocks/0/attn"},
            "llama": {"linear": "layers/0/mlp/up", "activation": "layers/0/mlp/act",
                      "attention": "layers/0/attn"}}


def _nested(key: str, block: dict) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nested(rest, block) if rest else block}


def _cases() -> list[tuple[str, str, str, str]]:
    """``(family, block key, method, layer type)`` for every method a block can build on
    every layer type it declares whose site role the method acts on."""
    cases = []
    for family, paths in FAMILIES.items():
        for block in rule_blocks():
            for method in methods(block.kind):
                roles = spec_class(block.kind, method).roles
                cases += [(family, block.key, method, layer) for layer, role in
                          block.layers.items() if role in roles and layer in paths]
    return cases


CASES = _cases()


def _model(family: str, key: str, method: str, layer: str) -> nnx.Module:
    extra = ["model.n_kv_head=1"] if family == "llama" else []  # grouped-query attention
    cfg = load_config(None, [*TINY_GPT, f"model.kind={family}", "model.n_layer=1", *extra])
    model = build_model(cfg, nnx.Rngs(params=0))
    block = {"method": method, **spec_class(block_for_key(key).kind, method).example_block}
    apply_rules(model, [{"path": FAMILIES[family][layer], **_nested(key, block)}],
                total_steps=1000)
    return model


def test_the_registry_yields_a_case_for_every_method_of_every_kind():
    # from the registry as it is now (other tests register methods of their own)
    covered = {(key, method) for _, key, method, _ in _cases()}
    for block in rule_blocks():
        takes = [m for m in methods(block.kind)
                 if set(spec_class(block.kind, m).roles) & set(block.layers.values())]
        assert takes, f"block {block.key} has no method"
        assert all((block.key, m) in covered for m in takes)
    assert len(CASES) >= 30


@pytest.mark.parametrize("family,key,method,layer", CASES,
                         ids=["-".join(c) for c in CASES])
def test_every_method_builds_from_its_defaults_and_configures_its_layer(family, key, method,
                                                                         layer):
    model = _model(family, key, method, layer)
    slots = [(path, slot) for path, _, _, slot in transform_slots(model)]
    assert [p for p, _ in slots] == [FAMILIES[family][layer]]
    assert slots[0][1].spec.method == method


@pytest.mark.slow
@pytest.mark.parametrize("family,key,method,layer", CASES,
                         ids=["-".join(c) for c in CASES])
def test_every_method_applies_the_same_under_jit_and_restores_bitwise(family, key, method,
                                                                      layer, tmp_path):
    model = _model(family, key, method, layer)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    graphdef, state = nnx.split(model)
    forward = lambda s, x: nnx.merge(graphdef, s, copy=True)(x)  # noqa: E731
    eager, jitted = forward(state, ids), jax.jit(forward)(state, ids)
    assert np.all(np.isfinite(np.asarray(eager)))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=2e-5, atol=2e-5)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    try:
        ckpt.save(0, {"state": state}, {"step": 0, "data_position": 0})
        restored, _ = ckpt.restore(0, {"state": state})
    finally:
        ckpt.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored["state"]), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
