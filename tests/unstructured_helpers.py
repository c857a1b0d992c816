"""Helpers of the unstructured-sparsity tests: a Linear with one method, its gradient-time
hook called directly, and a rule string for the tiny GPT."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.nn import Linear
from sparsejax.transforms import Context, Site

BLOCKS = "blocks/\\d+/(attn/(qkv|proj)|mlp/(fc|proj))"


def sparse_linear(spec, shape=(32, 16), seed=0, total_steps=100):
    """A ``Linear`` of ``shape`` with ``spec`` (bound to a run, planned alone)."""
    lin = Linear(*shape, rngs=nnx.Rngs(seed))
    planned = spec.bind(total_steps).plan([Site("weights", shape)])[0]
    lin.configure({"sparsity": planned}, seed=seed)
    return lin


def mask_of(lin) -> np.ndarray:
    return np.asarray(lin.sparsity.state["mask"][...])


def hook(lin, grad, step):
    """Run the layer's gradient-time hook at ``step``; updates the layer in place and
    returns the gradient the optimiser would get."""
    ctx = Context(True, jax.random.key(lin.seed), jnp.asarray(step, jnp.int32))
    w, g = lin.sparsity.update(lin.kernel[...], jnp.asarray(grad), ctx)
    lin.kernel[...] = w
    return np.asarray(g)


def rule(method: str, **fields) -> str:
    extra = "".join(f", {k}: {v}" for k, v in fields.items())
    return f"rules=[{{path: '{BLOCKS}', sparsity: {{method: {method}{extra}}}}}]"
