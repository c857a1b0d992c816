"""Post-training pruning (``prune:`` blocks of path rules; ``sparsejax prune``): one
method per file, each a registered spec whose :meth:`prune` is a pure function of the
trained weight and the calibration Gram matrix."""

from sparsejax.transforms.kinds import RuleBlock, declare_block
from sparsejax.transforms.prune.common import (
    PostTrainingPruning,
    PruneError,
    PruneResult,
    weighted_error,
)
from sparsejax.transforms.prune.dsf import DSF
from sparsejax.transforms.prune.magnitude import MagnitudePruning
from sparsejax.transforms.prune.sparsegpt import SparseGPT
from sparsejax.transforms.prune.wanda import Wanda

declare_block(RuleBlock(
    key="prune", kind="prune", stage="sparsity", order=20, default_method="sparsegpt",
    layers={"linear": "weights"}, log=("sparsity/{path}", "sparsity"),
    doc="post-training pruning, written by `sparsejax prune`"))

__all__ = ["DSF", "MagnitudePruning", "PostTrainingPruning", "PruneError", "PruneResult",
           "SparseGPT", "Wanda", "weighted_error"]
