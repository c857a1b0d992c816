"""Analog in-memory-computing transforms (``analog:`` blocks of path rules)."""

from sparsejax.transforms.analog.tile import NOISE_KINDS, AnalogSpec
from sparsejax.transforms.kinds import RuleBlock, declare_block

declare_block(RuleBlock(
    key="analog", kind="analog", stage="analog", order=40, default_method="tile",
    layers={"linear": "weights", "activation": "outputs"}, log=("analog/{path}", "analog"),
    doc="the analog tile (linear layers take its weight / output / converter fields, "
        "activation layers its act_* ones)"))

__all__ = ["NOISE_KINDS", "AnalogSpec"]
