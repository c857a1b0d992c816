"""Sparsity transforms (``sparsity:`` blocks of path rules)."""

from sparsejax.transforms.sparsity.dense import Dense
from sparsejax.transforms.sparsity.maskllm import MASK_PRIORS, MaskLLM
from sparsejax.transforms.sparsity.nm import HardNMSparsity, NMPattern, SparseMatmul
from sparsejax.transforms.sparsity.sr_ste import SRSTE
from sparsejax.transforms.sparsity.sste import SSTE
from sparsejax.transforms.sparsity.ste import STE

__all__ = ["MASK_PRIORS", "SRSTE", "SSTE", "STE", "Dense", "HardNMSparsity", "MaskLLM",
           "NMPattern", "SparseMatmul"]
