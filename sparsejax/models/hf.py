"""Hugging Face checkpoint mappings, each declared once by its family's mapping file
(``gpt_hf.py``, ``llama_hf.py``): the ``model_type`` values it reads, the ``model.*``
settings of a ``config.json`` and, for each of the family's parameters, the checkpoint
tensor that holds it. ``sparsejax.hf`` reads and writes checkpoints through these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["HFMapping", "HFTensor", "hf_mapping", "hf_model_types", "register_hf_mapping"]


class HFTensor(NamedTuple):
    """Where one parameter lives in a checkpoint: ``names`` (the first one present is read;
    checkpoints differ in prefixes) and whether it is stored transposed (PyTorch's
    ``nn.Linear`` keeps ``(out, in)``, our kernels ``(in, out)``)."""

    names: tuple[str, ...]
    transpose: bool = False


class HFMapping(NamedTuple):
    """``model_types``: the ``config.json`` ``model_type`` values; ``family``: the
    ``model.kind`` they load as; ``model_settings(config_json)``: the ``model.*`` values
    (raises ``KeyError`` naming a missing field, ``ValueError`` for one it cannot
    represent); ``tensors(model_config)``: ``{parameter path: HFTensor}``, paths as
    ``"/".join`` of the parameter's module path and name (``layers/0/attn/q/kernel``);
    ``export_config(model_config)``: the ``config.json`` of an export."""

    model_types: tuple[str, ...]
    family: str
    model_settings: Callable[[Mapping[str, Any]], dict[str, Any]]
    tensors: Callable[[Any], dict[str, HFTensor]]
    export_config: Callable[[Any], dict[str, Any]]


_MAPPINGS: dict[str, HFMapping] = {}


def register_hf_mapping(mapping: HFMapping) -> HFMapping:
    for model_type in mapping.model_types:
        _MAPPINGS[model_type] = mapping
    return mapping


def hf_model_types() -> tuple[str, ...]:
    return tuple(sorted(_MAPPINGS))


def hf_mapping(model_type: str) -> HFMapping:
    return _MAPPINGS[model_type]
