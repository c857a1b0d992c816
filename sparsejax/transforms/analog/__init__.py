"""Analog in-memory-computing transforms (``analog:`` blocks of path rules)."""

from sparsejax.transforms.analog.tile import NOISE_KINDS, AnalogSpec

__all__ = ["NOISE_KINDS", "AnalogSpec"]
