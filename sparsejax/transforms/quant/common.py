"""What the quantisers share: they act on a layer's weights (blocks along the kernel's
axis 0) or its input activations (blocks along the features), report the same
diagnostics (``sparsejax.quant.STAT_NAMES``), and check their bit width once."""

from __future__ import annotations

from dataclasses import dataclass

from sparsejax.quant import check_bits
from sparsejax.transforms.base import Site, SpecError, Transform

__all__ = ["Quantizer"]


@dataclass(frozen=True, kw_only=True)
class Quantizer(Transform):
    """Base of the quantisation methods (simulated: values rounded onto the low-precision
    grid, arithmetic in the input precision; docs/methods.md §3-4). ``block_size``, where a
    method has it, is the run of entries along the contracting axis that shares a scale;
    a mesh must not split it."""

    roles = ("weights", "activations")

    def check(self) -> None:
        if hasattr(self, "bits"):
            try:
                check_bits(self.bits)
            except ValueError as err:
                raise SpecError("bits", str(err)) from None
        if getattr(self, "block_size", 1) <= 0:
            raise SpecError("block_size", f"must be > 0, got {self.block_size}")

    def blocking(self, site: Site) -> list[tuple[str, int]]:
        size = getattr(self, "block_size", None)
        if size is None:
            return []
        tensor = "weight" if site.role == "weights" else "activation"
        return [(f"{tensor} quantisation blocks (block_size={size})",
                 min(size, site.shape[0]))]
