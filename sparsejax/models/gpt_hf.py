"""The GPT family's Hugging Face mapping: ``gpt2`` checkpoints (``GPT2LMHeadModel``) onto
:class:`~sparsejax.models.gpt.GPT`. GPT-2 stores its projections as ``Conv1D`` weights,
already ``(in, out)`` like our kernels; q, k, v are one ``c_attn`` as our ``qkv``. The
head is tied. Refused: an activation other than ``gelu_new`` (our GELU is the tanh form),
``scale_attn_by_inverse_layer_idx`` and ``reorder_and_upcast_attn``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparsejax.models.hf import HFMapping, HFTensor, register_hf_mapping

__all__ = ["gpt2_settings", "gpt2_tensors"]


def gpt2_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``model.*`` of a ``gpt2`` ``config.json``."""
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {config['activation_function']} is not "
                         "supported (gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            raise ValueError(f"{flag} is not supported")
    if float(config.get("layer_norm_epsilon", 1e-5)) != 1e-5:
        raise ValueError(f"layer_norm_epsilon {config['layer_norm_epsilon']} is not 1e-5")
    n_embd = int(config["n_embd"])
    inner = config.get("n_inner") or 4 * n_embd
    if inner % n_embd:
        raise ValueError(f"n_inner {inner} is not a multiple of n_embd {n_embd}")
    return {"vocab_size": int(config["vocab_size"]), "block_size": int(config["n_positions"]),
            "n_layer": int(config["n_layer"]), "n_head": int(config["n_head"]),
            "n_embd": n_embd, "mlp_ratio": inner // n_embd, "tie_embeddings": True}


def _names(name: str) -> tuple[str, ...]:
    """A GPT-2 tensor with and without the ``transformer.`` prefix (both are in use)."""
    return (f"transformer.{name}", name)


def gpt2_tensors(m: Any) -> dict[str, HFTensor]:
    """``{parameter path: checkpoint tensor}`` of a GPT with settings ``m``."""
    out = {"wte/embedding": HFTensor(_names("wte.weight")),
           "wpe/embedding": HFTensor(_names("wpe.weight")),
           "ln_f/scale": HFTensor(_names("ln_f.weight")),
           "ln_f/bias": HFTensor(_names("ln_f.bias"))}
    for i in range(m.n_layer):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            out[f"blocks/{i}/{ours}/scale"] = HFTensor(_names(f"h.{i}.{theirs}.weight"))
            out[f"blocks/{i}/{ours}/bias"] = HFTensor(_names(f"h.{i}.{theirs}.bias"))
        for ours, theirs in (("attn/qkv", "attn.c_attn"), ("attn/proj", "attn.c_proj"),
                             ("mlp/fc", "mlp.c_fc"), ("mlp/proj", "mlp.c_proj")):
            out[f"blocks/{i}/{ours}/kernel"] = HFTensor(_names(f"h.{i}.{theirs}.weight"))
            out[f"blocks/{i}/{ours}/bias"] = HFTensor(_names(f"h.{i}.{theirs}.bias"))
    return out


def gpt2_export_config(m: Any) -> dict[str, Any]:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_embd": m.n_embd,
            "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": m.mlp_ratio * m.n_embd,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


register_hf_mapping(HFMapping(model_types=("gpt2",), family="gpt",
                              model_settings=gpt2_settings, tensors=gpt2_tensors,
                              export_config=gpt2_export_config))
