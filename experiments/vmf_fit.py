"""Maximum-likelihood fit of the von Mises-Fisher concentration in high dimensions.

For each dimension d and true kappa, draws n unit vectors from VonMisesFisher(mu, kappa)
(Wood's sampler), then fits kappa by maximising the log-likelihood
``n (log C_d(kappa) + kappa R)`` (``R = |mean x|``, mu at its MLE ``mean x / R``) with
Newton steps on ``log kappa``, the derivatives by ``jax.grad`` through ``log_iv``.
Float64. The fit is only possible because ``log C_d`` is finite at these d: SciPy's
``ive(d/2 - 1, kappa)`` is 0 there.

    python experiments/vmf_fit.py                         # ~2 min on 2 CPU cores
    python experiments/vmf_fit.py --samples 4000 --dims 2048 8192 32768 65536
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from sparsejax.distributions import VonMisesFisher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_csv, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fit_kappa(x: jax.Array, steps: int = 30) -> tuple[float, float]:
    """MLE of kappa from unit vectors ``x`` (n, d); returns ``(kappa, R)``."""
    d = x.shape[-1]
    mean = jnp.mean(x, axis=0)
    r = jnp.linalg.norm(mean)
    mu = mean / r

    def neg_ll(log_kappa):  # per sample
        return -VonMisesFisher(mu, jnp.exp(log_kappa)).log_normalizer() - jnp.exp(log_kappa) * r

    grad, hess = jax.jit(jax.grad(neg_ll)), jax.jit(jax.grad(jax.grad(neg_ll)))
    # start from the usual approximation kappa ~ R (d - R^2) / (1 - R^2) (Banerjee et al.)
    log_kappa = jnp.log(r * (d - r * r) / (1 - r * r))
    for _ in range(steps):
        log_kappa = log_kappa - grad(log_kappa) / hess(log_kappa)
    return float(jnp.exp(log_kappa)), float(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--kappa-per-dim", type=float, nargs="+", default=[0.25, 4.0],
                        help="true kappa = factor * d")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "experiments/results/vmf_fit"))
    args = parser.parse_args()

    rows = []
    for d in args.dims:
        for factor in args.kappa_per_dim:
            kappa = factor * d
            key = jax.random.fold_in(jax.random.key(args.seed), d)
            mu = jax.random.normal(jax.random.fold_in(key, 1), (d,), jnp.float64)
            mu = mu / jnp.linalg.norm(mu)
            start = time.perf_counter()
            x = VonMisesFisher(mu, jnp.float64(kappa)).sample(key, (args.samples,))
            fitted, r = fit_kappa(x)
            rows.append({"d": d, "kappa_true": kappa, "kappa_fit": fitted,
                         "rel_error": fitted / kappa - 1, "R": r,
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    lines = ["# von Mises-Fisher: maximum-likelihood kappa in high dimensions", "",
             f"Command: `python experiments/vmf_fit.py --dims {' '.join(map(str, args.dims))} "
             f"--samples {args.samples}`  ",
             f"{args.samples} samples per row (Wood's sampler), Newton on log kappa with "
             "jax.grad through log_iv; float64; seed "
             f"{args.seed}.", "",
             "| d | true kappa | fitted kappa | relative error | mean resultant length R | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['d']} | {r['kappa_true']:g} | {r['kappa_fit']:.1f} | "
              f"{r['rel_error']:+.4f} | {r['R']:.4f} | {r['seconds']:.1f} |" for r in rows]
    lines += ["", "The small positive error at kappa = d/4 is the finite-sample bias of the "
              "mean resultant length in high dimensions (|mean x| overestimates A_d(kappa) by "
              "about (1 - R^2) / (2 n R), 0.8 % here), not an error of the Bessel function; it "
              "falls as 1/n. Every fit needs log I_{d/2-1}(kappa) at orders where SciPy's ive "
              "is 0.", ""]
    write_results(out, lines)


if __name__ == "__main__":
    main()
