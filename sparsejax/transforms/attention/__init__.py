"""Attention transforms (``attention:`` blocks of path rules): what an attention module
computes from its queries, keys and values in place of the softmax."""

from sparsejax.transforms.attention.cskv import CSKV
from sparsejax.transforms.attention.fp8 import FP8Attention
from sparsejax.transforms.attention.gaincell import GainCell
from sparsejax.transforms.attention.lmul import LMulAttention
from sparsejax.transforms.kinds import RuleBlock, declare_block

declare_block(RuleBlock(
    key="attention", kind="attention", stage="attention", order=50,
    default_method="gaincell", layers={"attention": "attention"},
    log=("attention/{path}", "attention"),
    doc="what an attention module (e.g. blocks/0/attn) computes in place of the softmax"))

__all__ = ["CSKV", "FP8Attention", "GainCell", "LMulAttention"]
