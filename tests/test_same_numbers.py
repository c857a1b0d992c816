"""Refactors keep the numbers: 12-step runs of every headline method and combination
(S-STE and the N:M set, MaskLLM, the dynamic set, DAT and the quantisers, analog tiles,
gain-cell from scratch and calibrated from a teacher, CSKV, L-Mul and FP8 attention) give
bitwise the train loss, validation loss and weights hash that an earlier revision gave.

The golden file is written by the earlier revision itself, side by side with this one:

    python experiments/revision_equivalence.py --base <rev> --no-timing \\
        --golden tests/data/same_numbers.json

A deliberate change of numbers regenerates it (and says why in its commit)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

GOLDEN = json.loads((REPO / "tests/data/same_numbers.json").read_text())
_spec = importlib.util.spec_from_file_location(
    "revision_equivalence", REPO / "experiments/revision_equivalence.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_a_short_run_reproduces_the_earlier_revision_bitwise(name):
    case = GOLDEN["cases"][name]
    out = subprocess.run([sys.executable, "-c", _module.RUN_CASE, case["config"],
                          json.dumps(case["overrides"])], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = {k: case[k] for k in ("train_loss", "val_loss", "weights")}
    assert got == want, f"{name}: {got} != {GOLDEN['base']}'s {want}"


def test_the_golden_file_covers_every_case_of_the_equivalence_script():
    assert sorted(GOLDEN["cases"]) == sorted(_module.CASES)
