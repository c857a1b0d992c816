"""Models built from :mod:`sparsejax.nn` layers."""

from sparsejax.models import gpt_hf, llama_hf  # noqa: F401  (register the HF mappings)
from sparsejax.models.base import LanguageModel
from sparsejax.models.family import Family, ModelField, families, family, register_family
from sparsejax.models.gpt import GPT
from sparsejax.models.hf import HFMapping, HFTensor, hf_mapping, hf_model_types
from sparsejax.models.llama import Llama
from sparsejax.models.mlp import MLPClassifier

__all__ = ["GPT", "Family", "HFMapping", "HFTensor", "LanguageModel", "Llama",
           "MLPClassifier", "ModelField", "families", "family", "hf_mapping", "hf_model_types",
           "register_family"]
