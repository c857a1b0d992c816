"""Sparsity transforms (``sparsity:`` blocks of path rules)."""

from sparsejax.transforms.kinds import RuleBlock, declare_block
from sparsejax.transforms.sparsity.dense import Dense
from sparsejax.transforms.sparsity.gmp import GMP
from sparsejax.transforms.sparsity.magnitude import Magnitude
from sparsejax.transforms.sparsity.maskllm import MaskLLM
from sparsejax.transforms.sparsity.nm import HardNMSparsity, NMPattern, SparseMatmul
from sparsejax.transforms.sparsity.random_mask import RandomMask
from sparsejax.transforms.sparsity.rigl import RigL
from sparsejax.transforms.sparsity.set_ import SET
from sparsejax.transforms.sparsity.snip import SNIP
from sparsejax.transforms.sparsity.sr_ste import SRSTE
from sparsejax.transforms.sparsity.sste import SSTE
from sparsejax.transforms.sparsity.ste import STE
from sparsejax.transforms.sparsity.unstructured import (
    DropAndGrow,
    UnstructuredSparsity,
    erk_densities,
    top_k_mask,
)

declare_block(RuleBlock(
    key="sparsity", kind="sparsity", stage="sparsity", order=20, default_method="sste",
    layers={"linear": "weights"}, log=("sparsity/{path}", "sparsity"),
    doc="sparse training of a linear layer's weight"))

__all__ = ["GMP", "SET", "SNIP", "SRSTE", "SSTE", "STE", "Dense", "DropAndGrow",
           "HardNMSparsity", "Magnitude", "MaskLLM", "NMPattern", "RandomMask", "RigL",
           "SparseMatmul", "UnstructuredSparsity", "erk_densities", "top_k_mask"]
