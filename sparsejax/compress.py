"""Post-training compression of a trained run's linear layers to a bits-per-weight budget
(``sparsejax compress``): 1-bit signed cuts (``sparsejax.numerics.signed_cuts``), and
as baselines absmax round-to-nearest and truncated SVD at the same storage.

Storage counted per (in, out) kernel, weights only (biases stay float32):

- ``signed_cuts``: ``w`` terms of ``in + out`` sign bits and one 16-bit coefficient,
  ``w = floor(bits * in * out / (in + out + 16))``;
- ``rtn``: ``b``-bit absmax round-to-nearest per output column with a 16-bit scale per
  column (``b = bits`` rounded down to an integer >= 1; 1 bit is ``sign(w) mean|w|``);
- ``rtn_minmax``: asymmetric min/max round-to-nearest per output column, ``2^b`` levels
  between the column's min and max, with a 16-bit scale and zero point per column (a
  fairer low-bit baseline than absmax, whose 2-bit grid is ternary);
- ``svd``: rank ``r = floor(bits * in * out / (16 (in + out)))`` with 16-bit factors.

The compressed weights are written as the kernels of a new run directory (step-0
checkpoint, the source's config, ``compress.json`` with the per-layer bits and errors), so
``evaluate``, ``sample``, ``compare`` and ``train.init_from`` read it like any run; the
factors themselves are not kept (simulation of the storage format).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.config import ConfigError, RuleConfig
from sparsejax.evaluation import evaluate_model
from sparsejax.nn import Linear, assign_rules, named_layers
from sparsejax.numerics.signed_cuts import signed_cut_width, signed_cuts
from sparsejax.quant import absmax_ste, quantize
from sparsejax.runs import load_model, resolve_checkpoint, write_step_zero_run
from sparsejax.transforms import CustomMatmul

__all__ = ["COMPRESSORS", "compress_run", "compress_weight"]

SCALAR_BITS = 16


def _signed_cuts(w: jax.Array, bits: float) -> tuple[jax.Array, float]:
    m, n = w.shape
    width = signed_cut_width(m, n, bits, SCALAR_BITS)
    approx = jax.jit(signed_cuts, static_argnums=1)(w, width).dense()
    return approx, width * (m + n + SCALAR_BITS) / (m * n)


def _rtn(w: jax.Array, bits: float) -> tuple[jax.Array, float]:
    b = max(1, int(bits))
    approx = absmax_ste(w, b, block_size=w.shape[0], axis=0)  # one scale per output column
    return approx, b + SCALAR_BITS / w.shape[0]


def _rtn_minmax(w: jax.Array, bits: float) -> tuple[jax.Array, float]:
    b = max(1, int(bits))
    codes, scale, zero = quantize(w, b, affine=True, block_size=w.shape[0], axis=0)
    return codes * scale + zero, b + 2 * SCALAR_BITS / w.shape[0]


def _svd(w: jax.Array, bits: float) -> tuple[jax.Array, float]:
    m, n = w.shape
    rank = max(1, int(bits * m * n // (SCALAR_BITS * (m + n))))
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return approx, rank * SCALAR_BITS * (m + n) / (m * n)


COMPRESSORS: dict[str, Callable[[jax.Array, float], tuple[jax.Array, float]]] = {
    "signed_cuts": _signed_cuts, "rtn": _rtn, "rtn_minmax": _rtn_minmax, "svd": _svd}


def compress_weight(method: str, w: jax.Array, bits: float) -> tuple[jax.Array, float]:
    """``(approximation, bits per weight it stores)`` of the kernel ``w`` (in, out) by
    ``method`` (:data:`COMPRESSORS`) within ``bits`` per weight."""
    if method not in COMPRESSORS:
        raise ValueError(f"method '{method}' is not one of {'|'.join(COMPRESSORS)}")
    if not bits > 0:
        raise ValueError(f"bits per weight must be > 0, got {bits}")
    return COMPRESSORS[method](jnp.asarray(w, jnp.float32), bits)


def _still_matches(model: Any, first: RuleConfig, rule: Any) -> bool:
    """Whether ``rule`` still claims a layer behind ``first`` (else it is dropped: its
    layers were all compressed)."""
    try:
        assign_rules(model, [first, rule])
    except ValueError:
        return False
    return True


def _compress_layers(targets: list[tuple[str, Linear]], method: str, bits: float,
                     progress: Callable[[str], None] | None
                     ) -> tuple[list[dict[str, Any]], float, int]:
    """Compress each target's inference weight in place (its weight transforms folded in);
    the per-layer report, the bits stored and the weights compressed."""
    per_layer, stored, total = [], 0.0, 0
    for path, layer in targets:
        w = layer.effective_kernel()
        approx, used = compress_weight(method, w, bits)
        error = float(jnp.linalg.norm(approx - w) / jnp.linalg.norm(w))
        layer.kernel[...] = approx
        layer.configure({}, layer.seed)  # its weight transforms are folded into the kernel
        per_layer.append({"path": path, "shape": list(w.shape), "bits_per_weight": used,
                          "rel_error": error})
        stored, total = stored + used * w.size, total + w.size
        if progress:
            progress(f"  {path:24s} {method} {used:.3f} bits/weight: relative error "
                     f"{error:.4f}")
    return per_layer, stored, total


def compress_run(run_dir: str | Path, out: str | Path, *, method: str, bits: float,
                 layers: str = r"blocks/\d+/(attn|mlp)/.*", step: int | None = None,
                 progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Compress the linear layers of ``run_dir`` matching ``layers`` with ``method`` at
    ``bits`` per weight and write the result as the run directory ``out``; returns the
    report (also ``out/compress.json``): validation metrics before and after, and per
    layer the bits stored and the relative Frobenius error. Raises :class:`ConfigError`
    (one line, nothing written) for a bad method, budget or regex, a matched layer with
    an input-quantisation or analog transform, a run without checkpoints or an existing
    ``out``."""
    out = Path(out)
    if method not in COMPRESSORS:
        raise ConfigError(f"--method '{method}' is not one of {'|'.join(COMPRESSORS)}")
    if not bits > 0:
        raise ConfigError(f"--bits must be > 0, got {bits}")
    if out.exists():
        raise ConfigError(f"--out {out} exists; choose a new directory")
    try:
        pattern = re.compile(layers)
    except re.error as err:
        raise ConfigError(f"--layers '{layers}' is not a regex: {err}") from None
    source_dir, step = resolve_checkpoint(run_dir, step)
    model, cfg, step = load_model(source_dir, step)
    targets = [(p, layer) for p, layer in named_layers(model, (Linear,))
               if pattern.fullmatch(p)]
    if not targets:
        paths = ", ".join(p for p, _ in named_layers(model, (Linear,)))
        raise ConfigError(f"--layers '{layers}' matches no linear layer; they are: {paths}")
    for path, layer in targets:  # only weight transforms with the plain product fold
        refused = [slot.spec for _, slot in layer.slots() if slot.role != "weights"
                   or (isinstance(slot.spec, CustomMatmul) and slot.spec.exclusive_matmul)]
        if refused:
            raise ConfigError(f"layer {path} has a {refused[0].kind} '{refused[0].method}' "
                              "transform that is not a weight transform under x @ W (input "
                              "quantisation, its own product), which compression cannot fold "
                              "into its weights; leave it out with --layers")
    before = evaluate_model(model, cfg)
    per_layer, stored, total = _compress_layers(targets, method, bits, progress)
    after = evaluate_model(model, cfg)
    report = {"source": str(source_dir), "source_step": step, "method": method,
              "bits": bits, "layers": layers, "bits_per_weight": stored / total,
              "before": before, "after": after, "per_layer": per_layer}
    new_cfg = copy.deepcopy(cfg)
    new_cfg.name, new_cfg.run_dir = out.name, str(out)
    new_cfg.train.init_from = None
    # the compressed layers are plain dense layers now: a first rule with no blocks
    # claims exactly them (first match wins), the source's rules keep the others
    first = RuleConfig(path="(" + "|".join(re.escape(p) for p, _ in targets) + ")")
    new_cfg.rules = [first, *(r for r in cfg.rules if _still_matches(model, first, r))]
    write_step_zero_run(out, new_cfg, model, "compress.json", report, "compression")
    if progress:
        progress(f"val loss {before['loss']:.4f} -> {after['loss']:.4f} at "
                 f"{stored / total:.3f} bits per weight; written {out}")
    return report
