"""Writes tests/data/hf/<case>/: a tiny random model saved by ``transformers``
(``config.json``, ``model.safetensors``) and its reference logits on fixed ids
(``reference.npz``), so that the default suite checks the Hugging Face import without
PyTorch. Needs ``pip install torch==2.13.0 transformers``.

    python tests/data/make_hf_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "hf"
VOCAB, HIDDEN, LAYERS, HEADS, CONTEXT = 320, 32, 2, 4, 64
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))


def configs():
    """``{case: transformers config}``: the families and options the import must cover."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=48,
                  max_position_embeddings=CONTEXT)
    return {
        "llama_gqa": LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                 rms_norm_eps=1e-5),
        "llama3_rope": LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                    "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}),
        "qwen2_bias_tied": Qwen2Config(**common, num_key_value_heads=2,
                                       tie_word_embeddings=True),
        "mistral": MistralConfig(**common, num_key_value_heads=2, sliding_window=None,
                                 tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=HIDDEN,
                           n_layer=LAYERS, n_head=HEADS),
    }


def save(case: str, config, out: Path) -> np.ndarray:
    """Save a seeded random model of ``config`` under ``out``; return its logits on IDS."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random (not zero) norms and biases, so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


def main() -> None:
    for case, config in configs().items():
        out = OUT / case
        logits = save(case, config, out)
        np.savez(out / "reference.npz", ids=IDS, logits=logits)
        print(case, sorted(p.name for p in out.iterdir()), file=sys.stderr)


if __name__ == "__main__":
    main()
