"""``sparsejax export``: a run (or checkpoint, or Hugging Face directory) written as a Hugging
Face model directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
``config.json`` (the family's mapping), ``model.safetensors`` (float32, the inference
weights: sparse layers dense with their zeros, MaskLLM's argmax masks applied, simulated
quantisation dequantised) and ``tokenizer.json`` when the source has one. Models with
transforms a checkpoint cannot represent (attention methods, analog tiles, input
quantisation) are refused in one line. Written beside ``--out`` and published by one
rename."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from sparsejax.config import Config
from sparsejax.errors import ConfigError
from sparsejax.hf import export_tensors, unexportable
from sparsejax.models import HFMapping, hf_mapping, hf_model_types
from sparsejax.runs import load_model, resolve_checkpoint, staged_directory

__all__ = ["export_run", "mapping_of"]


def mapping_of(cfg: Config) -> HFMapping:
    """The Hugging Face mapping of a run's family; raises :class:`ConfigError`."""
    found = [hf_mapping(t) for t in hf_model_types() if hf_mapping(t).family == cfg.model.kind]
    if not found:
        raise ConfigError(f"model.kind {cfg.model.kind} has no Hugging Face mapping; "
                          f"exportable families: "
                          f"{', '.join(sorted({hf_mapping(t).family for t in hf_model_types()}))}")
    if cfg.model.kind == "gpt" and not cfg.model.tie_embeddings:
        raise ConfigError("a GPT with an untied head (model.tie_embeddings=false) has no "
                          "gpt2 form: GPT-2 ties it")
    return found[0]


def _tokenizer_file(source: Path, cfg: Config) -> Path | None:
    """The tokenizer of the source: an HF directory's own, or a prepared corpus's."""
    for candidate in (source / "tokenizer.json",
                      Path(cfg.data.path or "") / "tokenizer.json" if cfg.data.path else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def export_run(source: str | Path, out: str | Path, step: int | None = None
               ) -> dict[str, Any]:
    """Export ``source`` to the new directory ``out``; returns ``{"out", "model_type",
    "tensors"}``."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; choose a new directory")
    run_dir, step = resolve_checkpoint(source, step)
    model, cfg, step = load_model(run_dir, step)
    model.eval()
    mapping = mapping_of(cfg)
    why = unexportable(model)
    if why:
        raise ConfigError(f"cannot export {run_dir}: {why}")
    config = mapping.export_config(cfg.model)
    model_type = config["model_type"]
    tensors = export_tensors(model, cfg, model_type)
    with staged_directory(out) as partial:
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = _tokenizer_file(run_dir, cfg)
        if tokenizer is not None:
            shutil.copy(tokenizer, partial / "tokenizer.json")
    return {"out": str(out), "model_type": model_type, "tensors": len(tensors), "step": step}
