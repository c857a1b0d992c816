"""Attention transforms (``attention:`` blocks of path rules): what an attention module
computes from its queries, keys and values in place of the softmax."""

from sparsejax.transforms.attention.cskv import CSKV
from sparsejax.transforms.attention.fp8 import FP8Attention
from sparsejax.transforms.attention.gaincell import GainCell
from sparsejax.transforms.attention.lmul import LMulAttention

__all__ = ["CSKV", "FP8Attention", "GainCell", "LMulAttention"]
