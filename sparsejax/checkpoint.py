"""Orbax checkpoints of the training state, plus a small JSON record of the data position.

Layout under ``<run_dir>/checkpoints/<step>/``: ``state`` (an Orbax ``StandardSave`` of
the pytree ``{params, rest, opt_state, rng}``, where ``rest`` holds a model's non-trainable
variables) and ``meta`` (JSON: step, data position, seed). Orbax writes each step into a
temporary directory and renames it when complete, so a process killed during a save leaves
the previous checkpoints usable; leftover temporary directories are removed when the
directory is next opened for writing (synchronously: Orbax's own clean-up runs in a
background thread that only its next ``save`` waits for).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Orbax names an unfinished step ``<step>.orbax-checkpoint-tmp[-<timestamp>]``.
_ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"

__all__ = ["Checkpointer"]


class Checkpointer:
    """Save every-k-steps checkpoints, keep the last ``keep``, restore the latest."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if not read_only:
            remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save, read_only=read_only,
            cleanup_tmp_directories=not read_only, create=not read_only)
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:  # Orbax warns "Given directory is read only" on every reader
            absl_logger.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.setLevel(level)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step``;
        returns once the arrays are copied to host when saving asynchronously."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the pytree saved at ``step`` into the structure (and shardings) of
        ``target``; returns ``(state, meta)``."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def remove_unfinished_saves(directory: Path) -> list[Path]:
    """Delete the temporary step directories a killed save left in ``directory`` (on
    process 0 only); returns what was removed. Finished steps are never touched."""
    if jax.process_index() != 0 or not directory.is_dir():
        return []
    leftovers = [p for p in directory.iterdir() if p.is_dir() and _ORBAX_TMP_MARKER in p.name]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers
