"""Pallas compiler parameters per backend, shared by the kernels (imported lazily, so a
machine without the Triton or Mosaic extras can still interpret the kernels)."""

from __future__ import annotations


def tpu_params(*semantics: str):
    """Mosaic parameters with one ``dimension_semantics`` entry per grid axis."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def triton_params(num_stages: int):
    """Triton parameters: 4 warps, ``num_stages`` software-pipelining stages."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=num_stages)
