"""Regenerate ``log_bessel_mpmath.json``: log I_v(x) and log K_v(x) from mpmath at 50
digits on a fixed grid (30 significant digits stored). Points where mpmath does not
converge within 20 s, or fails, are stored as null; where I_v(x) < 0 (negative orders)
the stored value is the log of |I| with ``"i_negative": true``.

mpmath's besselk is silently wrong at some large non-integer orders, at any precision
(log K_4725.18(3511.19): +656.48 instead of -664.79; ``experiments/bessel_accuracy.py``
takes K from an mpmath quadrature for that reason). On this grid its values agree with
that quadrature and with sparsejax.special to 1e-13; check again if the grid changes.

    python tests/data/make_log_bessel_values.py        # ~3 min; needs mpmath
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import mpmath as mp

mp.mp.dps = 50
ORDERS = [0.0, 0.3, 0.5, 1.0, 2.5, 7.0, 12.0, 13.5, 25.0, 80.0, 300.0, 1500.0,
          -0.5, -2.3, -7.5]
ARGUMENTS = [1e-6, 1e-3, 0.1, 0.9, 3.0, 12.0, 20.0, 29.0, 31.0, 65.0, 250.0, 1000.0, 5000.0]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def main() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for v in ORDERS:
        for x in ARGUMENTS:
            row = {"v": v, "x": x}
            for kind, fn in (("i", mp.besseli), ("k", mp.besselk)):
                signal.alarm(20)
                try:
                    value = fn(mp.mpf(v), mp.mpf(x))
                    if kind == "i" and value < 0:
                        row["i_negative"] = True
                    row[kind] = mp.nstr(mp.log(abs(value)), 30)
                except Exception:  # noqa: BLE001 - timeout or mpmath giving up: no value
                    row[kind] = None
                finally:
                    signal.alarm(0)
            rows.append(row)
    out = Path(__file__).with_name("log_bessel_mpmath.json")
    out.write_text(json.dumps(rows, indent=0) + "\n")


if __name__ == "__main__":
    main()
