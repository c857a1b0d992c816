"""The Llama family's Hugging Face mapping: ``llama``, ``mistral`` and ``qwen2`` checkpoints
(``LlamaForCausalLM`` and its relatives) onto :class:`~sparsejax.models.llama.Llama`.

``config.json``: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads`` (default: the heads), ``intermediate_size``,
``max_position_embeddings`` (the context; a Mistral ``sliding_window`` shorter than it
becomes the context, so every window is exact), ``rms_norm_eps``, the rotary base and
scaling (``rope_parameters`` of transformers 5, or ``rope_theta`` / ``rope_scaling``),
``tie_word_embeddings``, and q/k/v biases (``attention_bias``; always on for Qwen2).
Refused: a ``head_dim`` other than ``hidden_size / num_attention_heads``, MLP biases, a
rotary scaling other than ``default`` / ``llama3``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparsejax.models.hf import HFMapping, HFTensor, register_hf_mapping
from sparsejax.models.llama import default_mlp_hidden

__all__ = ["llama_settings", "llama_tensors"]


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """The rotary settings of a ``config.json`` (transformers 5 or 4 layout)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope type '{kind}' is not supported (default|llama3)")
    out = {"rope_theta": float(theta), "rope_scaling": "none" if kind == "default" else kind}
    if kind == "llama3":
        out.update(rope_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_context=int(rope["original_max_position_embeddings"]))
    return out


def llama_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``model.*`` of a ``llama`` / ``mistral`` / ``qwen2`` ``config.json``."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if config.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"head_dim {config['head_dim']} differs from hidden_size / "
                         f"num_attention_heads = {hidden // heads}")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported")
    context = int(config["max_position_embeddings"])
    if config.get("sliding_window") and (config.get("use_sliding_window", True)):
        context = min(context, int(config["sliding_window"]))
    return {"vocab_size": int(config["vocab_size"]), "block_size": context,
            "n_layer": int(config["num_hidden_layers"]), "n_head": heads, "n_embd": hidden,
            "n_kv_head": int(config.get("num_key_value_heads") or heads),
            "mlp_hidden": int(config["intermediate_size"]),
            "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "qkv_bias": bool(config.get("attention_bias", False))
            or config["model_type"] == "qwen2",
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)), **_rope(config)}


def llama_tensors(m: Any) -> dict[str, HFTensor]:
    """``{parameter path: checkpoint tensor}`` of a Llama with settings ``m``."""
    out = {"embed/embedding": HFTensor(("model.embed_tokens.weight",)),
           "norm/scale": HFTensor(("model.norm.weight",))}
    if not m.tie_embeddings:
        out["lm_head/kernel"] = HFTensor(("lm_head.weight",), transpose=True)
    for i in range(m.n_layer):
        layer = f"model.layers.{i}"
        out[f"layers/{i}/attn_norm/scale"] = HFTensor((f"{layer}.input_layernorm.weight",))
        out[f"layers/{i}/mlp_norm/scale"] = HFTensor(
            (f"{layer}.post_attention_layernorm.weight",))
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                             ("o", "o_proj")):
            out[f"layers/{i}/attn/{ours}/kernel"] = HFTensor(
                (f"{layer}.self_attn.{theirs}.weight",), transpose=True)
            if m.qkv_bias and ours != "o":
                out[f"layers/{i}/attn/{ours}/bias"] = HFTensor(
                    (f"{layer}.self_attn.{theirs}.bias",))
        for name in ("gate", "up", "down"):
            out[f"layers/{i}/mlp/{name}/kernel"] = HFTensor(
                (f"{layer}.mlp.{name}_proj.weight",), transpose=True)
    return out


def llama_export_config(m: Any) -> dict[str, Any]:
    """The ``config.json`` of a Llama export: ``model_type: llama``, or ``qwen2`` with q/k/v
    biases (Llama's ``attention_bias`` would bias ``o`` as well)."""
    rope: dict[str, Any] = {"rope_type": "default" if m.rope_scaling == "none"
                            else m.rope_scaling, "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope.update(factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                    high_freq_factor=m.rope_high_freq_factor,
                    original_max_position_embeddings=m.rope_original_context)
    model_type = "qwen2" if m.qkv_bias else "llama"
    architecture = "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"
    return {"model_type": model_type, "architectures": [architecture],
            "vocab_size": m.vocab_size, "hidden_size": m.n_embd,
            "intermediate_size": m.mlp_hidden or default_mlp_hidden(m.n_embd),
            "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
            "head_dim": m.n_embd // m.n_head, "max_position_embeddings": m.block_size,
            "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": m.tie_embeddings,
            "rope_parameters": rope, "rope_theta": m.rope_theta,
            "torch_dtype": "float32"}


register_hf_mapping(HFMapping(model_types=("llama", "mistral", "qwen2"), family="llama",
                              model_settings=llama_settings, tensors=llama_tensors,
                              export_config=llama_export_config))
