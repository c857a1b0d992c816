"""Helpers shared by the experiment scripts: reading TensorBoard scalars, writing CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalar_events(run_dir: str | Path) -> dict[str, list]:
    """``{tag: [ScalarEvent(wall_time, step, value), ...]}`` of a run directory."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
