"""Models built from :mod:`sparsejax.nn` layers."""

from sparsejax.models.base import LanguageModel
from sparsejax.models.family import Family, ModelField, families, family, register_family
from sparsejax.models.gpt import GPT
from sparsejax.models.llama import Llama
from sparsejax.models.mlp import MLPClassifier

__all__ = ["GPT", "Family", "LanguageModel", "Llama", "MLPClassifier", "ModelField",
           "families", "family", "register_family"]
