"""Time log I_v(x) and log K_v(x) on random points: ours (XLA, jit) against SciPy and,
when installed, TensorFlow Probability's JAX substrate; ratios from one run.

Points: ``v`` log-uniform in [1e-2, 1e3], ``x`` log-uniform in [1e-3, 1e4] (float64).
Each implementation runs once to warm up (compilation for ours), then ``--repeats``
times; the median is reported. SciPy computes ``log(ive(v, x)) + x`` and ``log(kve(v,
x)) - x`` (which are -inf / inf where ``ive`` / ``kve`` under- or overflow, counted).

    python experiments/bench_log_bessel.py                   # ~3 min on 2 CPU cores
    python experiments/bench_log_bessel.py --points 10000000 --repeats 7

Targets on CPU: >= 1x SciPy, >= 10x TFP.

TFP, optional: ``pip install tfp-nightly dm-tree decorator cloudpickle gast`` (the 0.25
release does not import with JAX 0.10; tfp-nightly 0.26.0.dev20261027 does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.special  # noqa: E402

from sparsejax.special import log_iv, log_kv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import tfp_jax, tfp_version, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_log_bessel"))
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    v = 10.0 ** rng.uniform(-2, 3, args.points)
    x = 10.0 ** rng.uniform(-3, 4, args.points)
    vj, xj = jnp.asarray(v), jnp.asarray(x)
    tfp = tfp_jax()
    have_tfp = tfp is not None

    rows = []
    for kind, ours_fn, scipy_fn in (
            ("log I", jax.jit(log_iv), lambda: np.log(scipy.special.ive(v, x)) + x),
            ("log K", jax.jit(log_kv), lambda: np.log(scipy.special.kve(v, x)) - x)):
        t_ours, ours = timed(lambda f=ours_fn: f(vj, xj).block_until_ready(), args.repeats)
        with np.errstate(divide="ignore", over="ignore"):
            t_scipy, ref = timed(scipy_fn, args.repeats)
        row = {"function": kind, "ours_s": t_ours, "scipy_s": t_scipy,
               "scipy_nonfinite": int(np.sum(~np.isfinite(ref))),
               "ours_nonfinite": int(np.sum(~np.isfinite(ours)))}
        if have_tfp:
            tfp_fn = (tfp.math.log_bessel_ive if kind == "log I"
                      else tfp.math.log_bessel_kve)
            f = jax.jit(lambda a, b, g=tfp_fn: g(a, b))
            row["tfp_s"], _ = timed(lambda f=f: f(vj, xj).block_until_ready(), args.repeats)
        rows.append(row)
        print(row, flush=True)

    lines = ["# log-Bessel throughput: ours (XLA) vs SciPy" + (" and TFP" if have_tfp else ""),
             "", f"Command: `python experiments/bench_log_bessel.py --points {args.points} "
             f"--repeats {args.repeats}`  ",
             f"{args.points:,} points, v log-uniform in [1e-2, 1e3], x log-uniform in [1e-3, "
             f"1e4], float64; {jax.device_count()} x {jax.devices()[0].platform}, jax "
             f"{jax.__version__}, SciPy {scipy.__version__}{tfp_version()}; median of "
             f"{args.repeats} runs "
             "after a warm-up.", "",
             "| function | ours (s) | SciPy (s) | speed-up vs SciPy | TFP (s) | speed-up vs TFP "
             "| non-finite: ours / SciPy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tfp_cells = (f"{r['tfp_s']:.3f} | {r['tfp_s'] / r['ours_s']:.2f}x" if "tfp_s" in r
                     else "not installed | -")
        lines.append(f"| {r['function']} | {r['ours_s']:.3f} | {r['scipy_s']:.3f} | "
                     f"{r['scipy_s'] / r['ours_s']:.2f}x | {tfp_cells} | "
                     f"{r['ours_nonfinite']} / {r['scipy_nonfinite']} |")
    lines += ["", "Targets: >= 1x SciPy, >= 10x TFP (CPU).", ""]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
