"""A training loop made of hooks (levanter's ``Trainer.add_hook(fn, every=N)`` and
``StepInfo``): the loop only steps and, at the steps some hook is due, brings the pending
metrics to the host once and runs the hooks in the order they were added. Evaluation,
checkpoints, TensorBoard, progress, the NaN stop and per-transform logging are all hooks
(``sparsejax.train``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax

__all__ = ["Hook", "StepInfo", "Trainer"]


@dataclass
class StepInfo:
    """What the hooks of one log point see.

    ``step``: optimiser steps done; ``state``: the training state after them; ``host``:
    the metrics of every step since the previous log point, on the host (``first_step``
    is the index of ``host[0]``); ``seconds``: the wall time of those steps; ``scalars``:
    filled by hooks for the hooks after them (the writer and progress hooks log it);
    ``last``: the final step of the run."""

    step: int
    state: Any
    host: list[dict[str, Any]]
    first_step: int
    seconds: float
    last: bool
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Hook:
    """``fn(info)`` every ``every`` steps (None: at every log point) and, with
    ``at_end``, at the final step."""

    fn: Callable[[StepInfo], None]
    every: int | None = None
    at_end: bool = False

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0


class Trainer:
    """``step_fn(state, step) -> (state, metrics)`` run from ``start`` to ``total``. Log
    points are every ``log_every`` steps, the steps where some hook is due (``every``) and
    the last step; hooks with ``every=None`` run at every log point, the others when due."""

    def __init__(self, step_fn: Callable[[Any, int], tuple[Any, dict[str, Any]]],
                 to_host: Callable[[Any], Any] = jax.device_get, log_every: int = 1):
        self.step_fn = step_fn
        self.to_host = to_host
        self.log_every = log_every
        self.hooks: list[Hook] = []
        self.train_seconds = 0.0  # step time of the log intervals (hooks excluded)
        self.train_steps = 0

    def add_hook(self, fn: Callable[[StepInfo], None], every: int | None = None,
                 at_end: bool = False) -> None:
        self.hooks.append(Hook(fn, every, at_end))

    def run(self, state: Any, start: int, total: int) -> Any:
        """Train from step ``start`` to ``total``; returns the final state."""
        pending: list[dict[str, Any]] = []
        interval_start = time.perf_counter()
        for step in range(start, total):
            state, metrics = self.step_fn(state, step)
            pending.append(metrics)
            done = step + 1
            last = done == total
            due = [h for h in self.hooks if h.due(done) or (last and h.at_end)]
            if not (due or last or done % self.log_every == 0):
                continue
            host = self.to_host(pending)  # the sync point: the steps have now run
            seconds = time.perf_counter() - interval_start
            info = StepInfo(done, state, host, done - len(pending), seconds, last)
            self.train_seconds += seconds
            self.train_steps += len(pending)
            for hook in self.hooks:
                if hook.every is None or any(hook is h for h in due):
                    hook.fn(info)
            pending = []
            interval_start = time.perf_counter()
        return state
