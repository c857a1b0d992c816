"""What the N:M sparsity methods share: the pattern check, the blocking a mesh must keep
whole, and - for the hard-masked methods (STE, SR-STE, S-STE) - the sparse linear op with
its optional MVUE / FP8 backward and packed 2:4 kernel (docs/methods.md §1, §7)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from sparsejax.kernels.nm_matmul import pack_nm
from sparsejax.sparse_linear import nm_linear
from sparsejax.sparsity import check_nm, flip_rate, threshold_nm
from sparsejax.transforms.base import (
    Context,
    CustomMatmul,
    Metrics,
    Packable,
    Site,
    SpecError,
    State,
    Transform,
    View,
)

__all__ = ["KERNELS", "NEAR_THRESHOLD", "HardNMSparsity", "NMPattern", "SparseMatmul"]

KERNELS = ("xla", "pallas")
# Weights within 1e-3 of their group threshold: the ones about to flip.
NEAR_THRESHOLD = 1e-3


@dataclass(frozen=True, kw_only=True)
class NMPattern(Packable, Transform):
    """``n`` of every ``m`` consecutive weights along the contracting axis are kept."""

    n: int = 2
    m: int = 4

    def check(self) -> None:
        if not 1 <= self.n < self.m:
            raise SpecError("n", f"N:M pattern {self.n}:{self.m} needs 1 <= n < m")

    def check_site(self, site: Site) -> None:
        check_nm(site.shape, self.n, self.m, axis=0)

    @property
    def produces_zeros(self) -> bool:
        return True

    @property
    def mask_group(self) -> int:
        return self.m

    def blocking(self, site: Site) -> list[tuple[str, int]]:
        return [(f"N:M groups (m={self.m})", self.m)]

    def pack(self, w: jax.Array):
        return pack_nm(w, self.n, self.m, prune=True) if self.m <= 4 else None


@dataclass(frozen=True, kw_only=True)
class SparseMatmul(CustomMatmul, Transform):
    """The layer's matmul as :func:`~sparsejax.sparse_linear.nm_linear` (S-STE's GEMM
    layout). ``mvue``: sparsify the output gradient 2:4 along tokens for the weight
    gradient (a fresh draw per call, keyed by a checkpointed counter); ``fp8``: simulate
    FP8 operands; ``kernel``: ``xla`` (dense matmul with zeros) or ``pallas`` (forward and
    input-gradient GEMMs on the packed weight; a hard N:M method with ``m <= 4``)."""

    mvue: bool = False
    fp8: bool = False
    kernel: str = "xla"

    def check(self) -> None:
        if self.kernel not in KERNELS:
            raise SpecError("kernel", f"kernel '{self.kernel}' is not one of "
                            f"{'|'.join(KERNELS)}")
        if self.kernel == "pallas" and (not self.produces_zeros
                                        or getattr(self, "m", 5) > 4):
            raise SpecError("kernel", f"kernel 'pallas' needs a hard-masked method "
                            f"(ste|sr_ste|sste) and m <= 4, got {self.method} "
                            f"{getattr(self, 'n', '-')}:{getattr(self, 'm', '-')}")

    def init(self, site: Site, x: jax.Array | None, key: jax.Array) -> State:
        return {"count": jnp.zeros((), jnp.uint32)} if self.mvue else {}


    @property
    def exclusive_matmul(self) -> str | None:
        for name, on in (("mvue", self.mvue), ("fp8", self.fp8),
                         ("kernel", self.kernel == "pallas")):
            if on:
                return name
        return None

    def matmul(self, x: jax.Array, w: jax.Array, state: State, ctx: Context
               ) -> tuple[jax.Array, State]:
        key = None
        if self.mvue:  # a fresh key per call, resumable from the counter
            key = jax.random.fold_in(ctx.key, state["count"])
            state = {**state, "count": state["count"] + 1}
        packed = (self.n, self.m) if self.kernel == "pallas" else None
        y = nm_linear(x, w.astype(x.dtype), key, mvue=self.mvue, fp8_sim=self.fp8,
                      packed=packed)
        return y, state


@dataclass(frozen=True, kw_only=True)
class HardNMSparsity(SparseMatmul, NMPattern):
    """A hard N:M mask in the forward (``E * w``, or S-STE's ``beta * S(w)``) multiplied
    through the sparse matmul of :class:`SparseMatmul`."""

    def check(self) -> None:
        NMPattern.check(self)
        SparseMatmul.check(self)

    def step_metrics(self, site: Site, before: View, after: View) -> Metrics:
        """Realised sparsity of the effective weight, the fraction of mask entries that
        changed in the step, and the fraction of weights within :data:`NEAR_THRESHOLD` of
        their group's threshold tau (not counting the pruned entry that defines tau)."""
        w = after.x
        tau = threshold_nm(w, self.n, self.m, 0)
        near = jnp.sum(jnp.abs(jnp.abs(w) - tau) < NEAR_THRESHOLD) - w.size // self.m
        w_eff = self.inference_weight(w, after.params, after.state, site)
        return {"sparsity": jnp.mean(w_eff == 0),
                "flip_rate": flip_rate(before.x, w, self.n, self.m, 0),
                "near_threshold": near / w.size}
