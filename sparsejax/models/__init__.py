"""Models built from :mod:`sparsejax.nn` layers."""

from sparsejax.models.base import LanguageModel
from sparsejax.models.gpt import GPT
from sparsejax.models.mlp import MLPClassifier

__all__ = ["GPT", "MLPClassifier", "LanguageModel"]
