"""Accuracy of log I_v(x) and log K_v(x) against mpmath (40 digits) on a log-spaced grid.

Grid: v = 0 and log-spaced in [1e-3, 1e4], x log-spaced in [1e-6, 1e6] (``--n`` each, 45 x
45 = 2025 points by default), plus points on both sides of every region boundary of the
algorithm (x = 30, v = 12.7, x = 19.69, v^2 = 2x). Truth (40 digits): mpmath ``besseli`` for I
and, for K, the integral ``K_v(x) = int_0^inf exp(-x cosh t) cosh(v t) dt`` by a converged
trapezoidal rule in mpmath arithmetic (mpmath's ``besselk`` is wrong at large non-integer
orders at any precision), accepted where the Wronskian ``x (I_v K_{v+1} + I_{v+1} K_v) = 1``
holds to 1e-25; each point under a time limit (``--timeout``) in a pool of processes;
points without truth are counted, not scored. Truth is cached in ``truth.csv`` beside the results.

Scored: ours in float64 and float32 (``sparsejax.special``), SciPy (``log(ive) + x``,
``log(kve) - x``) and TFP's JAX substrate when installed; max and median of
``|ours - truth| / max(1, |truth|)``, and the count of non-finite outputs. Writes
``results.md``, ``errors.csv`` and ``error_heatmap.png`` (our float64 and float32 error).

    python experiments/bessel_accuracy.py                    # ~10 min on 2 CPU cores
    python experiments/bessel_accuracy.py --n 80 --timeout 20

Random points: float32 is also scored on ``--random`` (10,000) log-uniform points of the
same domain, off the grid, against our float64 at the same float32-rounded inputs (the
float64 path is the one checked against mpmath above).

Targets: float64 max <= 1e-13, float32 max <= 2e-6 (grid and random points), no -inf/NaN
anywhere in the grid.

TFP, optional: ``pip install tfp-nightly dm-tree decorator cloudpickle gast`` (the 0.25
release does not import with JAX 0.10; tfp-nightly 0.26.0.dev20261027 does).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import signal
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _mp_log_k(mp, v, x):
    """log K_v(x) from ``K_v(x) = (1/2) int_{-inf}^{inf} exp(-x cosh t) cosh(v t) dt``
    (DLMF 10.32.9) by the trapezoidal rule in mpmath arithmetic, on the window where the
    integrand is within e^-90 of its peak (near ``asinh(v / x)``); the node count doubles
    from 256 until two successive sums agree to 1e-28. An independent route: mpmath's own
    besselk is wrong at large non-integer orders at any precision (log K_4725.18(3511.19)
    = +656.48 at 50 and at 800 digits; the truth is -664.79), with errors of the form
    ``alpha I_v`` that the Wronskian cannot see."""

    def g(t):  # log of the integrand
        at = abs(t)
        return -x * mp.cosh(t) + v * at + mp.log1p(mp.exp(-2 * v * at)) - mp.log(2)

    peak = mp.asinh(v / x)
    top = g(peak)
    step = 1 / mp.sqrt(mp.sqrt(x * x + v * v))
    hi = peak + step
    while g(hi) - top > -90:
        hi = peak + 2 * (hi - peak)

    def edge(inside, outside):  # bisect to where g falls e^-90 below the peak
        for _ in range(80):
            mid = (inside + outside) / 2
            if g(mid) - top < -90:
                outside = mid
            else:
                inside = mid
        return outside

    hi = edge(peak, hi)
    # the window reaches 0: integrate the even integrand over [-hi, hi]
    lo = -hi if g(0) - top > -90 else edge(peak, mp.mpf(0))
    previous = None
    for n in (256, 512, 1024, 2048, 4096, 8192, 16384):
        h = (hi - lo) / n
        total = mp.fsum(mp.exp(g(lo + k * h) - top) for k in range(n + 1)) * h
        if lo >= 0:
            total = 2 * total
        if previous is not None and abs(total - previous) < mp.mpf(10) ** -28 * total:
            return top + mp.log(total / 2)
        previous = total
    return None


def _truth_one(args: tuple[float, float, int]) -> tuple[str | None, str | None]:
    """log I_v(x) from mpmath's besseli (a positive series) and log K_v(x) from
    :func:`_mp_log_k`, at 40 digits, accepted only when the Wronskian
    ``x (I_v K_{v+1} + I_{v+1} K_v) = 1`` holds to 1e-25."""
    import mpmath as mp

    v, x, timeout = args
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        mp.mp.dps = 40
        a, b = mp.mpf(v), mp.mpf(x)
        log_k0, log_k1 = _mp_log_k(mp, a, b), _mp_log_k(mp, a + 1, b)
        i0, i1 = mp.besseli(a, b), mp.besseli(a + 1, b)
        if log_k0 is None or log_k1 is None or not (i0 > 0 and i1 > 0):
            return None, None
        wronskian = b * (mp.exp(mp.log(i0) + log_k1) + mp.exp(mp.log(i1) + log_k0))
        if abs(wronskian - 1) > mp.mpf(10) ** -25:
            return None, None
        return mp.nstr(mp.log(i0), 25), mp.nstr(log_k0, 25)
    except Exception:  # noqa: BLE001 - timeout or mpmath giving up: no truth here
        return None, None
    finally:
        signal.alarm(0)


def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    vs = np.concatenate([[0.0], np.logspace(-3, 4, n - 1)])
    xs = np.logspace(-6, 6, n)
    v, x = (a.ravel() for a in np.meshgrid(vs, xs, indexing="ij"))
    edge = [1 - 1e-9, 1 + 1e-9]
    extra = []
    for s in edge:
        for t in np.logspace(-2, 1.1, 12):  # across x = 30 and x = 19.69
            extra += [(t, 30.0 * s), (t, 19.69 * s)]
        for t in np.logspace(-5, 5, 12):  # across v = 12.7 and v^2 = 2x
            extra += [(12.7 * s, t)]
        for t in np.logspace(1.5, 6, 12):
            extra += [(np.sqrt(2 * t) * s, t)]
    ev, ex = np.array(extra).T
    return np.concatenate([v, ev]), np.concatenate([x, ex])


def load_truth(path: Path, v, x, timeout: int) -> tuple[np.ndarray, np.ndarray]:
    cached = {}
    if path.is_file():
        with open(path) as f:
            for row in csv.DictReader(f):
                cached[(float(row["v"]), float(row["x"]))] = (row["log_i"] or None,
                                                              row["log_k"] or None)
    todo = [(a, b) for a, b in zip(v, x, strict=True) if (float(a), float(b)) not in cached]
    if todo:
        with multiprocessing.Pool(2) as pool:
            for (a, b), res in zip(todo, pool.imap(_truth_one, [(a, b, timeout) for a, b in todo],
                                                   chunksize=4), strict=True):
                cached[(float(a), float(b))] = res
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["v", "x", "log_i", "log_k"])
            for (a, b), (i, k) in cached.items():
                w.writerow([repr(a), repr(b), i or "", k or ""])
    pairs = [cached[(float(a), float(b))] for a, b in zip(v, x, strict=True)]
    to_float = np.vectorize(lambda s: np.nan if s is None else float(s), otypes=[float])
    return to_float(np.array([p[0] for p in pairs], object)), to_float(
        np.array([p[1] for p in pairs], object))


def score(ours, truth) -> dict[str, float]:
    have = np.isfinite(truth)
    err = np.abs(np.asarray(ours, np.float64) - truth) / np.maximum(1.0, np.abs(truth))
    err = np.where(np.isfinite(ours), err, np.inf)[have]
    return {"max": float(np.max(err)), "median": float(np.median(err)),
            "nonfinite": int(np.sum(~np.isfinite(np.asarray(ours)[have]))),
            "scored": int(have.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=45)
    parser.add_argument("--timeout", type=int, default=10,
                        help="seconds of mpmath per point (all precisions)")
    parser.add_argument("--random", type=int, default=10000,
                        help="log-uniform random points for the float32 check")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random points")
    parser.add_argument("--out", default=str(REPO / "experiments/results/bessel_accuracy"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    v, x = grid(args.n)
    # float32 is scored at its own inputs (v, x rounded to float32), which need their truth
    v32, x32 = (np.float32(a).astype(np.float64) for a in (v, x))
    all_i, all_k = load_truth(out / "truth.csv", np.concatenate([v, v32]),
                              np.concatenate([x, x32]), args.timeout)
    truth_i, truth_k = all_i[: v.size], all_k[: v.size]
    truth32_i, truth32_k = all_i[v.size:], all_k[v.size:]

    import jax  # after the truth pool has forked: JAX's threads do not survive a fork

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import mpmath
    import scipy.special
    from common import tfp_jax, tfp_version, write_results

    from sparsejax.special import log_iv, log_kv

    results, errors = [], {}
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        candidates = {
            "ours float64": (log_iv(jnp.asarray(v), jnp.asarray(x)),
                             log_kv(jnp.asarray(v), jnp.asarray(x))),
            "ours float32": (log_iv(jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32)),
                             log_kv(jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32))),
            "SciPy": (np.log(scipy.special.ive(v, x)) + x, np.log(scipy.special.kve(v, x)) - x),
        }
        tfp = tfp_jax()
        if tfp is not None:
            candidates["TFP"] = (tfp.math.log_bessel_ive(v, x) + x,
                                 tfp.math.log_bessel_kve(v, x) - x)
    for name, (oi, ok) in candidates.items():
        f32 = name == "ours float32"
        for kind, ours, truth in (("log I", oi, truth32_i if f32 else truth_i),
                                  ("log K", ok, truth32_k if f32 else truth_k)):
            s = score(np.asarray(ours, np.float64), truth)
            results.append({"implementation": name, "function": kind, **s})
            errors[(name, kind)] = np.abs(np.asarray(ours, np.float64) - truth) / np.maximum(
                1.0, np.abs(truth))
            print(results[-1], flush=True)

    # float32 off the grid: log-uniform points, rounded to float32, against our float64
    rng = np.random.default_rng(args.seed)
    rv, rx = (np.float32(np.exp(rng.uniform(np.log(lo), np.log(hi), args.random)))
              .astype(np.float64) for lo, hi in ((1e-3, 1e4), (1e-6, 1e6)))
    random_rows = []
    for kind, fn in (("log I", log_iv), ("log K", log_kv)):
        reference = np.asarray(fn(jnp.asarray(rv), jnp.asarray(rx)))
        ours = np.asarray(fn(jnp.asarray(rv, jnp.float32), jnp.asarray(rx, jnp.float32)),
                          np.float64)
        s = score(ours, reference)
        err = np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))
        worst = int(np.nanargmax(np.where(np.isfinite(reference), err, -1.0)))
        random_rows.append({"function": kind, **s, "above": int(np.sum(err > 2e-6)),
                            "worst": (float(rv[worst]), float(rx[worst]))})
        print(random_rows[-1], flush=True)

    with open(out / "errors.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["v", "x", "truth_log_i", "truth_log_k", "err64_i", "err64_k",
                    "err32_i", "err32_k"])
        for row in zip(v, x, truth_i, truth_k, errors[("ours float64", "log I")],
                       errors[("ours float64", "log K")], errors[("ours float32", "log I")],
                       errors[("ours float32", "log K")], strict=True):
            w.writerow([f"{c:.17g}" for c in row])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = args.n
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for ax, (name, kind) in zip(axes.ravel(), [(a, b) for a in ("ours float64", "ours float32")
                                               for b in ("log I", "log K")], strict=True):
        e = errors[(name, kind)][: n * n].reshape(n, n)
        img = ax.pcolormesh(np.log10(x[:n * n].reshape(n, n)),
                            np.log10(np.maximum(v[:n * n].reshape(n, n), 1e-4)),
                            np.log10(np.maximum(e, 1e-18)), vmin=-18, vmax=-4, shading="auto")
        ax.set(xlabel="log10 x", ylabel="log10 v (v = 0 at the bottom)",
               title=f"{kind}, {name}: log10 rel. error (white: no truth)")
        fig.colorbar(img, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "error_heatmap.png", dpi=80)

    lines = ["# log I and log K against mpmath (40 digits, Wronskian-checked)", "",
             f"Command: `python experiments/bessel_accuracy.py --n {args.n} --timeout "
             f"{args.timeout} --random {args.random} --seed {args.seed}`  ",
             f"{len(v)} points ({args.n} x {args.n} grid, v in {{0}} + [1e-3, 1e4], x in "
             "[1e-6, 1e6], log-spaced, plus both sides of every region boundary). Error = "
             "|value - truth| / max(1, |truth|) over the points where the truth (mpmath besseli, "
             "K by a converged trapezoidal rule in mpmath) satisfied the Wronskian to 1e-25 "
             "within "
             f"{args.timeout} s (scored count in the table; float32 against the truth at its "
             "float32-rounded inputs).", "",
             "| implementation | function | max error | median error | non-finite | scored |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['implementation']} | {r['function']} | {r['max']:.2e} | "
              f"{r['median']:.2e} | {r['nonfinite']} | {r['scored']} |" for r in results]
    lines += ["", f"## float32 on {args.random} random points (seed {args.seed})", "",
              "v log-uniform in [1e-3, 1e4], x in [1e-6, 1e6], both rounded to float32; "
              "reference: our float64 at the same inputs.", "",
              "| function | max error | median error | points above 2e-6 | worst (v, x) | "
              "non-finite |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['function']} | {r['max']:.2e} | {r['median']:.2e} | {r['above']} | "
              f"({r['worst'][0]:.6g}, {r['worst'][1]:.6g}) | {r['nonfinite']} |"
              for r in random_rows]
    lines += ["", f"Versions: jax {jax.__version__}, SciPy {scipy.__version__}, mpmath "
              f"{mpmath.__version__}{tfp_version()}.", "",
              "Targets: float64 max <= 1e-13, float32 max <= 2e-6, no -inf/NaN. "
              "Heat map of our error: `error_heatmap.png`.", ""]
    write_results(out, lines)


if __name__ == "__main__":
    sys.exit(main())
