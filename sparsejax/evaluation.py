"""Validation of a model on its task's fixed batches, as the trainer reports it."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import jax
from flax import nnx

from sparsejax.config import Config
from sparsejax.sharding import put_replicated, to_host
from sparsejax.tasks import Task, build_task

__all__ = ["evaluate", "evaluate_model", "make_eval_step"]


def make_eval_step(graphdef: nnx.GraphDef, task: Task) -> Callable:
    """The pure ``(params, rest, batch) -> sums`` of the task's validation metrics, on the
    model in inference form."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()  # inference form of stochastic transforms (MaskLLM: argmax masks)
        return task.eval_sums(model, batch)

    return eval_step


def evaluate(eval_step: Callable, state: Any, task: Task, mesh: Any = None
             ) -> dict[str, float]:
    """Validation metrics over the task's fixed batches (replicated over ``mesh`` when
    given, so every process evaluates the same); ``state``: anything with the model's
    ``params`` and ``rest`` (a ``TrainState``)."""
    sums: dict[str, float] = {}
    for batch in task.eval_batches():
        if mesh is not None:
            batch = put_replicated(batch, mesh)
        for k, v in to_host(eval_step(state.params, state.rest, batch)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in task.finish_eval(sums).items()}


def evaluate_model(model: nnx.Module, cfg: Config, task: Task | None = None
                   ) -> dict[str, float]:
    """Validation metrics of ``model`` (in its inference form: ``model.eval()`` is applied
    to a copy) on the fixed validation batches of ``cfg``'s task, as the trainer reports
    them (``loss``, ``bpb`` / ``accuracy``, ...)."""
    task = task or build_task(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(make_eval_step(graphdef, task))
    return evaluate(eval_step, SimpleNamespace(params=params, rest=rest), task)
