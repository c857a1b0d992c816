"""Where training metrics go: TensorBoard event files (tensorboardX) and the terminal.

The terminal gets a tqdm progress bar when stderr is a terminal, plain log lines otherwise
(CI logs, notebooks, ``nohup``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["Progress", "TensorBoardWriter", "format_table"]


class TensorBoardWriter:
    """Scalars, the config as text, and hparams (so runs compare in the HParams tab).

    ``purge_step``: on resume, events at or after this step written by the interrupted
    process are hidden by TensorBoard, so curves do not fold back on themselves.
    """

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        # Markdown: indent by four spaces to keep YAML layout as a code block.
        self._writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams_start(self, hparams: Mapping[str, Any], metric_tags: list[str]) -> None:
        from tensorboardX.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                 for k, v in hparams.items() if v is not None}
        exp, ssi, _ = hparams_summary(clean, {tag: 0.0 for tag in metric_tags})
        self._writer.file_writer.add_summary(exp)
        self._writer.file_writer.add_summary(ssi)
        self._hparams = clean
        self._metric_tags = metric_tags

    def hparams_end(self) -> None:
        from tensorboardX.summary import hparams as hparams_summary

        if getattr(self, "_hparams", None) is not None:
            _, _, sei = hparams_summary(self._hparams, {t: 0.0 for t in self._metric_tags})
            self._writer.file_writer.add_summary(sei)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class Progress:
    """Progress bar or log lines; ``mode`` is auto | bar | lines | none."""

    def __init__(self, total: int, initial: int, mode: str = "auto", unit: str = "tok"):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.unit = mode, total, unit
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._start = time.perf_counter()

    def update(self, step: int, values: Mapping[str, float]) -> None:
        shown = {_SHOWN[k]: v for k, v in values.items() if k in _SHOWN}
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: _fmt(v) for k, v in shown.items()}, refresh=True)
        elif self.mode == "lines":
            parts = " ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
            print(f"step {step:>6d}/{self.total}  {parts}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif self.mode != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


_SHOWN = {"train/loss": "loss", "val/loss": "val_loss", "val/bpb": "val_bpb",
          "val/bits_per_token": "val_bits/tok", "val/accuracy": "val_acc", "train/lr": "lr",
          "throughput/tokens_per_sec": "tok/s", "throughput/samples_per_sec": "samples/s"}


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def format_table(rows: list[tuple[str, Any]], title: str | None = None) -> str:
    """Two-column plain-text table."""
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] if title else []
    for key, value in rows:
        value = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
