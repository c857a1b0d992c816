"""Every error sparsejax raises on purpose, in one module that any other may import.

Bad input is a :class:`ConfigError` (or a subclass): its message is one line naming the
offending key, flag, file or value, and ``kind`` is how the command line labels it
(``sparsejax: config error: ...``, exit 2). A spec field a transform refuses is a
:class:`SpecError` (its ``field`` is prefixed with the rule key by the config). A run that
diverged is a :class:`NonFiniteLossError` (exit 3). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CompareError", "ConfigError", "NonFiniteLossError",
           "OutOfMemoryError", "PrepareError", "PruneError", "RunDirError", "SpecError"]


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key. ``kind`` is how the
    command line labels it (``sparsejax: config error: ...``)."""

    kind = "config error"


class CheckpointError(ConfigError):
    """A checkpoint or run directory that cannot be found or read (``train.init_from``,
    ``sparsejax compare``, ``evaluate-analog``); the message is one line naming the path."""

    kind = "checkpoint error"


class CompareError(CheckpointError):
    """A checkpoint ``sparsejax compare`` cannot find or read; the message is one line."""


class RunDirError(ConfigError):
    """The run directory holds something this run must not overwrite."""

    kind = "run directory error"


class PrepareError(ConfigError):
    """Bad input to ``sparsejax prepare`` or an unreadable prepared corpus (one line)."""

    kind = "prepare error"


class OutOfMemoryError(ConfigError):
    """The model or its compiled step does not fit in the device's memory; the message is
    one line with the parameter count and, once compiled, the step's memory estimate."""

    kind = "out of memory"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the run stopped."""


class SpecError(ValueError):
    """A spec field that cannot be used; ``field`` names it, so the config reports
    ``rules.<i>.<block>.<field>``. ``unknown``: the field does not exist for the method."""

    def __init__(self, field: str, message: str, *, unknown: bool = False):
        super().__init__(message)
        self.field = field
        self.unknown = unknown


class PruneError(ValueError):
    """A layer that cannot be pruned as asked (a singular calibration matrix, a budget
    the factorisation cannot meet); the message names the reason."""
