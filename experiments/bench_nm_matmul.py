"""Packed 2:4 matmul against the dense matmul, side by side: ``y = x @ W``, ``x (M, K)``,
``W (K, N)`` 2:4 sparse along K.

For every M in {1, 16, 128, 2048} and K = N in {4096, 8192} it times (jit, after warm-up,
median of alternating repeats): the dense matmul of the masked weight, the packed Pallas
kernel (GPU / TPU only), and the XLA path (unpack, then dense matmul). It prints each
speed-up over dense and the achieved bandwidth next to the memory-bound limit: a packed
2:4 weight is 9/16 of the dense bytes, so when the weight read dominates (small M) the
best possible speed-up is 16/9 = 1.78.

    python experiments/bench_nm_matmul.py                 # CPU: dense and XLA path only
    python experiments/bench_nm_matmul.py --dtype bfloat16 --repeats 20   # on a GPU/TPU

On CPU the Pallas kernel only runs in interpret mode (a correctness tool, not timed here);
its figures need a GPU or TPU. Goal on an H100: >= 1.5x over dense bf16 for M <= 16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from sparsejax.kernels.nm_matmul import nm_matmul, pack_nm, packed_nbytes

from sparsejax.sparsity import nm_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn, args, repeats: int) -> float:
    """Seconds per call: median over ``repeats`` of a few back-to-back calls."""
    out = fn(*args)
    jax.block_until_ready(out)
    calls = 3
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def main() -> None:
    accelerator = jax.default_backend() in ("gpu", "cuda", "tpu")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 2048])
    parser.add_argument("--kn", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--dtype", default="bfloat16" if accelerator else "float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_nm_matmul"))
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]

    dense_fn = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
                       .astype(x.dtype))
    xla_fn = jax.jit(lambda x, p: nm_matmul(x, p, backend="xla"))
    pallas_fn = jax.jit(lambda x, p: nm_matmul(x, p, backend="pallas", interpret=False))
    rows = []
    for kn in args.kn:
        w = jax.random.normal(jax.random.key(0), (kn, kn), jnp.float32)
        w = jnp.where(nm_mask(w, 2, 4, 0), w, 0.0).astype(dtype)
        p = pack_nm(w, prune=True)
        for m_rows in args.m:
            x = jax.random.normal(jax.random.key(1), (m_rows, kn), jnp.float32).astype(dtype)
            io = (m_rows * kn + m_rows * kn) * dtype.itemsize  # x in, y out
            dense_bytes, packed_bytes = kn * kn * dtype.itemsize + io, packed_nbytes(p) + io
            t_dense = timed(dense_fn, (x, w), args.repeats)
            t_xla = timed(xla_fn, (x, p), args.repeats)
            t_pallas = timed(pallas_fn, (x, p), args.repeats) if accelerator else None
            rows.append({"M": m_rows, "K=N": kn, "dense_ms": 1e3 * t_dense,
                         "pallas_ms": None if t_pallas is None else 1e3 * t_pallas,
                         "xla_ms": 1e3 * t_xla,
                         "speedup_pallas": None if t_pallas is None else t_dense / t_pallas,
                         "speedup_xla": t_dense / t_xla,
                         "dense_GBps": dense_bytes / t_dense / 1e9,
                         "pallas_GBps": None if t_pallas is None else packed_bytes / t_pallas / 1e9,
                         "memory_bound_limit": dense_bytes / packed_bytes})
            print(rows[-1], flush=True)

    fmt = lambda v, spec: "needs GPU/TPU" if v is None else format(v, spec)
    lines = ["# Packed 2:4 matmul vs dense", "",
             f"Command: `python experiments/bench_nm_matmul.py --dtype {args.dtype} "
             f"--repeats {args.repeats}`  ",
             f"Device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
             f"dtype {args.dtype}; medians of alternating repeats.", "",
             "| M | K = N | dense ms | Pallas ms | XLA path ms | Pallas speed-up | "
             "XLA-path speed-up | dense GB/s | Pallas GB/s | memory-bound limit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['K=N']} | {r['dense_ms']:.3f} | "
                     f"{fmt(r['pallas_ms'], '.3f')} | {r['xla_ms']:.3f} | "
                     f"{fmt(r['speedup_pallas'], '.2f')} | {r['speedup_xla']:.2f} | "
                     f"{r['dense_GBps']:.1f} | {fmt(r['pallas_GBps'], '.1f')} | "
                     f"{r['memory_bound_limit']:.2f} |")
    if not accelerator:
        lines += ["", "No GPU/TPU here: the Pallas kernel runs only in interpret mode on CPU "
                  "(tested for correctness in tests/test_nm_matmul.py, not timed). The XLA path "
                  "unpacks the weight every call, so it is slower than dense: it exists for "
                  "correctness and portability, not speed."]
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
