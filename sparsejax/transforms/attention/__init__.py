"""Attention transforms (``attention:`` blocks of path rules): what an attention module
computes from its queries, keys and values in place of the softmax."""

from sparsejax.transforms.attention.gaincell import GainCell

__all__ = ["GainCell"]
