"""Hugging Face model directories as sources: ``config.json`` plus ``model.safetensors`` (or
a sharded ``model.safetensors.index.json``), read wherever a run directory is
(:func:`sparsejax.runs.load_model`).

Loading builds the model abstractly (no memory), then fills it tensor by tensor from the
safetensors files through the family's mapping (``sparsejax.models.*_hf``), casting
float16 / bfloat16 / float32 to the float32 parameters; no PyTorch involved. Errors are
one line naming the field, tensor (with both shapes) or file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from sparsejax.config import Config, from_dict
from sparsejax.errors import CheckpointError, ConfigError
from sparsejax.models import hf_mapping, hf_model_types
from sparsejax.nn import Linear, named_layers, param_name, transform_slots
from sparsejax.tasks import build_model
from sparsejax.transforms import CustomMatmul

__all__ = ["export_tensors", "is_hf_dir", "load_hf_model", "read_hf_config", "safetensors_index",
           "unexportable"]


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (and not a run directory)."""
    path = Path(path)
    return ((path / "config.json").is_file() and not (path / "config.yaml").exists()
            and ((path / "model.safetensors").is_file()
                 or (path / "model.safetensors.index.json").is_file()))


def read_hf_config(directory: str | Path) -> tuple[Config, dict[str, Any]]:
    """The sparsejax :class:`Config` of an HF directory (byte-level default data, no
    rules) and its ``config.json``. Raises :class:`ConfigError` naming an unsupported
    ``model_type`` or a missing or unsupported field."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / 'config.json'}: unreadable ({err})") from None
    model_type = config.get("model_type")
    if model_type not in hf_model_types():
        raise ConfigError(f"{directory / 'config.json'}: model_type {model_type!r} is not "
                          f"supported; supported: {', '.join(hf_model_types())}")
    mapping = hf_mapping(model_type)
    try:
        settings = mapping.model_settings(config)
    except KeyError as err:
        raise ConfigError(f"{directory / 'config.json'}: {model_type} needs the field "
                          f"{err.args[0]}") from None
    except ValueError as err:
        raise ConfigError(f"{directory / 'config.json'}: {err}") from None
    cfg = from_dict({"name": directory.name or "hf", "run_dir": str(directory),
                     "model": {"kind": mapping.family, **settings}})
    return cfg, config


def safetensors_index(directory: Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a single ``model.safetensors`` or a sharded index; raises
    :class:`CheckpointError` naming a shard the index lists but the directory lacks."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{index_file}: unreadable ({err})") from None
        files = {name: directory / shard for name, shard in weight_map.items()}
        missing = sorted({f for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index_file} names {missing[0].name}, which "
                                  f"{directory} lacks")
        return files
    single = directory / "model.safetensors"
    with safe_open(str(single), framework="flax") as handle:
        return {name: single for name in handle.keys()}


def _read(files: Mapping[str, Path], names: tuple[str, ...], directory: Path) -> jax.Array:
    name = next((n for n in names if n in files), None)
    if name is None:
        raise CheckpointError(f"{directory}: tensor {names[0]} is missing")
    with safe_open(str(files[name]), framework="flax") as handle:
        return handle.get_tensor(name)


def load_hf_model(directory: str | Path) -> tuple[nnx.Module, Config]:
    """The model of an HF directory with its weights, in training mode, and its config.
    Peak host memory: the float32 model plus one tensor."""
    directory = Path(directory)
    cfg, _ = read_hf_config(directory)
    tensors = hf_mapping(json.loads((directory / "config.json").read_text())["model_type"]
                         ).tensors(cfg.model)
    files = safetensors_index(directory)
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(params=0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = param_name(path)
        if name not in tensors:
            raise CheckpointError(f"{directory}: no checkpoint tensor maps to parameter "
                                  f"{name}")
        spec = tensors[name]
        value = _read(files, spec.names, directory)
        value = value.T if spec.transpose else value
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{directory}: tensor {spec.names[0]} has shape "
                                  f"{tuple(np.shape(value))}, the model needs "
                                  f"{tuple(leaf.shape)}")
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, params)
    rest = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), rest)
    return nnx.merge(graphdef, params, rest), cfg


def unexportable(model: nnx.Module) -> str | None:
    """Why ``model`` has no Hugging Face form (None when it has one): a transform that is
    not a weight transform under a plain ``x @ W`` (attention methods such as CSKV and
    gain-cell, analog tiles, input quantisation, activation noise, L-Mul products)."""
    for path, _, _, slot in transform_slots(model):
        spec = slot.spec
        if slot.role != "weights" or (isinstance(spec, CustomMatmul) and spec.exclusive_matmul):
            return (f"{path} carries {spec.kind} '{spec.method}', which a Hugging Face "
                    "checkpoint cannot represent (only weight transforms under x @ W fold "
                    "into its weights)")
    return None


def export_tensors(model: nnx.Module, cfg: Config, model_type: str) -> dict[str, np.ndarray]:
    """``{checkpoint tensor name: float32 array}`` of ``model`` in inference form: each
    linear layer's effective weight (sparse layers dense with their zeros, MaskLLM's argmax
    masks applied, simulated quantisation dequantised)."""
    linears = {f"{path}/kernel": layer for path, layer in named_layers(model, (Linear,))}
    params = {param_name(p): v
              for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    out = {}
    for path, spec in hf_mapping(model_type).tensors(cfg.model).items():
        value = linears[path].effective_kernel() if path in linears else params[path]
        value = np.asarray(value, np.float32)
        out[spec.names[0]] = np.ascontiguousarray(value.T if spec.transpose else value)
    return out
