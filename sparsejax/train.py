"""The trainer: ``run(config) -> results``, the one entry point for the CLI, experiments and
notebooks.

The model is an NNX module split once into ``(graphdef, params, rest)``; the train step is
a pure jitted function of ``(params, rest, opt_state, batch, step)``, so the trainer adds
nothing per step beyond what a hand-written Flax + optax loop does (measured by
``experiments/bench_train.py``). ``rest`` holds a model's non-trainable variables
(S-STE scales, MaskLLM and noise counters, quantisation statistics) and is threaded
through the step.

Resumption: the batch and the dropout key of step ``s`` are pure functions of
``(seed, s)``, and checkpoints hold params, optimiser state and the RNG key, so a run
restarted from its latest checkpoint - after ``kill -9`` too - ends bitwise identical
(on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.adapt import calibrate_from_teacher
from sparsejax.checkpoint import Checkpointer
from sparsejax.config import Config, to_flat_dict, to_yaml
from sparsejax.errors import ConfigError, NonFiniteLossError, OutOfMemoryError, RunDirError
from sparsejax.evaluation import evaluate, make_eval_step
from sparsejax.loop import StepInfo, Trainer
from sparsejax.nn import (
    apply_updates,
    has_updates,
    layer_metrics,
    loss_terms,
    snapshot_changes,
    snapshots,
    transform_slots,
)
from sparsejax.optim import build_optimizer
from sparsejax.reporting import Progress, TensorBoardWriter, format_table
from sparsejax.runs import (
    TrainState,
    count_params,
    init_model_with_source,
    prepare_run_dir,
    resolve_run_dir,
    restore_newest_intact,
    uncalibrated_layers,
    write_atomic,
)
from sparsejax.sharding import (
    check_transform_sharding,
    logical_axes,
    make_mesh,
    process_rows,
    put_batch,
    put_state,
    state_shardings,
    to_host,
)
from sparsejax.tasks import Task, build_model, build_task
from sparsejax.transforms import Calibration

__all__ = ["NonFiniteLossError", "RunDirError", "make_train_step", "run"]

@contextlib.contextmanager
def _out_of_memory_in_one_line(cfg: Config, stage: str, step_bytes: Sequence[int] = ()):
    """Turn an allocation failure inside the block into :class:`OutOfMemoryError`."""
    try:
        yield
    except Exception as err:
        if not (isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in str(err)):
            raise
        raise OutOfMemoryError(out_of_memory_message(
            cfg, err, stage, step_bytes[0] if step_bytes else None)) from None


def out_of_memory_message(cfg: Config, err: BaseException, stage: str,
                          step_bytes: int | None = None) -> str:
    """One line: what ran out (``stage``), the model's size from an abstract build (no
    memory used), the compiled step's estimate when known, and XLA's own first line."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(params=0)))
    n = count_params(nnx.state(abstract, nnx.Param))
    estimate = (f"; the compiled train step needs {step_bytes / 2**30:.2f} GiB"
                if step_bytes else "")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{stage} ran out of memory: the model has {n:,} parameters ({n * 4 / 2**30:.2f} "
            f"GiB in float32, {n * 16 / 2**30:.2f} GiB with AdamW's moments and gradients)"
            f"{estimate}; {first[:160]}")


# --------------------------------------------------------------------------- building blocks


def _forward_backward(graphdef: nnx.GraphDef, task: Task, params: Any, rest: Any,
                      batch: Any, key: jax.Array | None) -> tuple[Any, jax.Array, dict, Any]:
    """``(grads, task loss, aux metrics, new rest)`` of one batch: the gradient of the task
    loss plus the transforms' loss terms."""

    def loss_of(p):
        # copy=True: transforms update their state (counters) inside the grad trace,
        # which NNX only allows on variables created in that trace.
        model = nnx.merge(graphdef, p, rest, copy=True)
        loss, aux = task.loss(model, batch, key)
        terms = loss_terms(model)
        objective = loss
        for term in terms.values():
            objective = objective + term
        return objective, (loss, {**aux, **terms}, nnx.split(model, nnx.Param, ...)[2])

    (_, (loss, aux, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return grads, loss, aux, new_rest


def _accumulate(graphdef: nnx.GraphDef, task: Task, grad_accum: int, params: Any, rest: Any,
                batch: Any, key: jax.Array | None) -> tuple[Any, jax.Array, dict, Any]:
    """:func:`_forward_backward` over ``grad_accum`` micro-batches (rows ``i::k``) in a
    ``lax.scan``: the mean gradient, loss and metrics, and the last micro-batch's rest."""
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, inputs):
        index, part = inputs
        part_key = None if key is None else jax.random.fold_in(key, index)
        grads, loss, aux, new_rest = _forward_backward(graphdef, task, params, rest, part,
                                                       part_key)
        sums = jax.tree.map(jnp.add, carry[0], (grads, loss, aux))
        return (sums, new_rest), None

    first = jax.eval_shape(functools.partial(_forward_backward, graphdef, task), params, rest,
                           jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), first[:3])
    (sums, new_rest), _ = jax.lax.scan(body, (zeros, rest), (jnp.arange(grad_accum), micro))
    grads, loss, aux = jax.tree.map(lambda x: x / grad_accum, sums)
    return grads, loss, aux, new_rest


def make_train_step(graphdef: nnx.GraphDef, task: Task, tx: optax.GradientTransformation,
                    use_dropout: bool, frozen_labels: Any = None, grad_accum: int = 1):
    """The pure train step ``(params, rest, opt_state, rng, batch, step) ->
    (params, rest, opt_state, metrics)``; ``metrics['finite']`` is False when the loss,
    the gradient or the updated parameters hold a NaN/Inf.

    The differentiated objective is the task loss plus the transforms' loss terms
    (:func:`~sparsejax.nn.loss_terms`, logged under their names; ``metrics['loss']`` is the
    task loss alone). Transforms with a gradient-time hook (``Transform.update``) then
    rewrite their weight, state and gradient, before the optimiser. ``frozen_labels``:
    parameters labelled ``weights`` get no gradient (zeroed before clipping, so XLA drops
    their weight-gradient GEMMs).

    ``grad_accum = k > 1``: the batch is split into ``k`` micro-batches (rows ``i::k``, so a
    batch sharded over devices splits without moving data), a ``lax.scan`` sums their
    gradients, and the mean - the full batch's gradient, as micro-batches are equal - goes
    to the hooks and the optimiser once. Every micro-batch starts from the step's
    transform state, as one full-batch call would (a stochastic transform draws the same
    mask or noise for all of them, as it does for all rows of a batch); the dropout key is
    folded with the micro-batch index. Activations live for one micro-batch at a time."""

    def train_step(params, rest, opt_state, rng, batch, step):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step) if use_dropout else None
        if grad_accum > 1:
            grads, loss, aux, new_rest = _accumulate(graphdef, task, grad_accum, params, rest,
                                                     batch, key)
        else:
            grads, loss, aux, new_rest = _forward_backward(graphdef, task, params, rest, batch,
                                                           key)
        model = nnx.merge(graphdef, params, new_rest, copy=True)
        if has_updates(model):  # gradient-time hooks (decided while tracing)
            grad_model = nnx.merge(graphdef, grads, new_rest, copy=True)
            apply_updates(model, grad_model, step)
            _, params, new_rest = nnx.split(model, nnx.Param, ...)
            grads = nnx.split(grad_model, nnx.Param, ...)[1]
        if frozen_labels is not None:
            grads = jax.tree.map(lambda label, g: jnp.zeros_like(g) if label == "weights"
                                 else g, frozen_labels, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        old_params, params = params, optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        # One flag for everything that would make a checkpoint of this state unusable.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.tree.norm(params)))
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux, "finite": finite,
                   **layer_metrics(nnx.merge(graphdef, old_params, rest),
                                   nnx.merge(graphdef, params, new_rest))}
        return params, new_rest, opt_state, metrics

    return train_step


# --------------------------------------------------------------------------- run directory


# --------------------------------------------------------------------------- the loop


def run(cfg: Config, *, verbose: bool = True) -> dict[str, Any]:
    """Train ``cfg``, resuming from the run directory's latest checkpoint if there is one.

    Returns the results dict (also written to ``<run_dir>/results.json``): final train and
    validation metrics, data baselines, throughput, parameter count, steps.
    Raises :class:`ConfigError` / :class:`RunDirError` before writing anything when the
    config or run directory is unusable, and :class:`NonFiniteLossError` when the loss
    diverges (the last good checkpoint is kept).
    """
    run_dir = resolve_run_dir(cfg)
    resuming = prepare_run_dir(cfg, run_dir)
    try:
        task = build_task(cfg)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None

    checkpoints = run_dir / "checkpoints"
    has_checkpoint = resuming and checkpoints.is_dir() and any(
        p.name.isdigit() for p in checkpoints.iterdir())
    with _out_of_memory_in_one_line(cfg, "building the model"):
        model, source = init_model_with_source(cfg, load_init=not has_checkpoint)
    unpruned = [] if has_checkpoint else uncalibrated_layers(model)
    if unpruned:
        raise ConfigError(f"a prune rule matches {unpruned[0]}, which was never pruned: set "
                          "train.init_from to a run written by `sparsejax prune` (it carries "
                          "the masks), or prune this one first")
    if source is not None:
        calibrate_from_teacher(cfg, model, source, verbose)
    needy = [(path, slot.spec) for path, _, _, slot in transform_slots(model)
             if isinstance(slot.spec, Calibration) and slot.spec.requires_init_from]
    if needy and not has_checkpoint and not cfg.train.init_from:
        path, spec = needy[0]
        raise ConfigError(f"{spec.kind} method '{spec.method}' on {path} starts from a trained "
                          "model: set train.init_from to its run directory")
    mesh = make_mesh(cfg.mesh)
    check_transform_sharding(model, mesh)
    with jax.set_mesh(mesh):  # models pin their activations to this mesh (shard_batch)
        step_bytes: list[int] = []  # the compiled step's estimate, once known
        with _out_of_memory_in_one_line(cfg, "training", step_bytes):
            return _train_on_mesh(cfg, run_dir, resuming, task, model, mesh, verbose,
                                  step_bytes)


def _initial_state(cfg: Config, model: nnx.Module, mesh: Mesh):
    """The optimiser, the split model and the training state placed on ``mesh``:
    ``(graphdef, tx, schedule, frozen_labels, state, shardings)``."""
    tx, schedule, frozen_labels = build_optimizer(cfg, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    host_state = TrainState(params=params, rest=rest, opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(cfg.train.seed))).as_dict()
    shardings = state_shardings(host_state, mesh, logical_axes(model))
    return graphdef, tx, schedule, frozen_labels, TrainState(**put_state(host_state,
                                                                          shardings)), shardings


def _compile(step_fn, args: tuple, step_bytes: list[int]):
    """``step_fn`` compiled ahead for ``args`` (so throughput excludes compilation);
    appends its memory estimate to ``step_bytes``."""
    compiled = step_fn.lower(*args).compile()
    memory = compiled.memory_analysis()
    if memory is not None:
        step_bytes.append(int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                              + memory.output_size_in_bytes))
    return compiled


class _Checkpoints:
    """The checkpoint hook: saves the state with its data position and loop time."""

    def __init__(self, ckpt: Checkpointer, cfg: Config, items: int, prior_seconds: float,
                 start: int):
        self.ckpt, self.cfg, self.items = ckpt, cfg, items
        self.prior_seconds, self.loop_start = prior_seconds, time.perf_counter()
        self.last_saved = start if start else None

    def loop_seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.loop_start

    def __call__(self, info: StepInfo) -> None:
        step = info.step
        self.ckpt.save(step, info.state.as_dict(),
                       {"step": step, "data_position": step, "seed": self.cfg.train.seed,
                        "items_seen": step * self.items, "loop_seconds": self.loop_seconds()})
        self.last_saved = step

    def describe_last(self) -> str:
        return (f"step {self.last_saved} in {self.ckpt.directory}" if self.last_saved
                else "none")


def _stop_on_non_finite(checkpoints: _Checkpoints) -> Callable[[StepInfo], None]:
    """The NaN hook: every step since the last log point is checked before anything is
    logged or saved."""

    def check(info: StepInfo) -> None:
        for offset, m in enumerate(info.host):
            if not m["finite"]:
                raise NonFiniteLossError(
                    f"non-finite loss, gradient or parameters at step "
                    f"{info.first_step + offset + 1} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); stopped. Last good checkpoint: "
                    + checkpoints.describe_last())

    return check


class _IntervalScalars:
    """The metrics hook: interval means of the step metrics (keys that carry their own
    namespace, ``sparsity/...``, keep it; the rest go under ``train/``), the learning rate,
    throughput and, for token tasks, bits per token. ``means`` keeps the latest interval's
    for the results."""

    def __init__(self, task: Task, schedule: optax.Schedule):
        self.task, self.schedule = task, schedule
        self.means: dict[str, float] = {}

    def __call__(self, info: StepInfo) -> None:
        host, task = info.host, self.task
        self.means = {(k if "/" in k else f"train/{k}"): float(np.mean([m[k] for m in host]))
                      for k in host[0] if k != "finite"}
        info.scalars.update(self.means)
        info.scalars["train/lr"] = float(self.schedule(info.step - 1))
        info.scalars[f"throughput/{task.item_name}_per_sec"] = (
            len(host) * task.items_per_batch / info.seconds)
        if "train/loss" in info.scalars and task.item_name == "tokens":
            info.scalars[f"train/{task.bits_name}"] = info.scalars["train/loss"] / math.log(2)


def _snapshot_changes(graphdef: nnx.GraphDef, state: TrainState, mesh: Mesh):
    """The per-transform logging hook: the fraction of each transform's discrete choice
    that changed since the previous log point (``Transform.snapshot``; MaskLLM: mask
    candidates). None when no transform has one."""
    replicated = NamedSharding(mesh, PartitionSpec())
    snap = jax.jit(lambda p, r: snapshots(nnx.merge(graphdef, p, r)), out_shardings=replicated)
    last = [to_host(snap(state.params, state.rest))]
    if not last[0]:
        return None

    def log(info: StepInfo) -> None:
        now = to_host(snap(info.state.params, info.state.rest))
        info.scalars.update(snapshot_changes(last[0], now))
        last[0] = now

    return log


def _open_run_dir(cfg: Config, run_dir: Path, state: TrainState, lead: bool
                  ) -> tuple[Checkpointer, TrainState, int, float]:
    """The run's checkpointer, the state restored from its newest intact checkpoint (onto
    this run's mesh, whatever mesh saved it), the step to start from and the step-loop time
    of earlier sessions; writes ``config.yaml`` once the restore succeeded."""
    if jax.process_count() > 1:  # every process has read the run dir before it changes
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("sparsejax: run dir checked")
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    start, prior_seconds = 0, 0.0
    if ckpt.all_steps():
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if lead else None
        restored, meta, start = restore_newest_intact(ckpt, state.as_dict(), say)
        state, prior_seconds = TrainState(**restored), float(meta.get("loop_seconds", 0.0))
    if lead:  # after the restore: a run with no intact checkpoint is left as it was
        write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    return ckpt, state, start, prior_seconds


def _train_on_mesh(cfg: Config, run_dir: Path, resuming: bool, task: Task,
                   model: nnx.Module, mesh: Mesh, verbose: bool,
                   step_bytes: list[int]) -> dict[str, Any]:
    """The body of :func:`run` once the run dir is checked and the mesh is built; appends
    the compiled step's memory estimate (bytes) to ``step_bytes``."""
    graphdef, tx, schedule, frozen, state, shardings = _initial_state(cfg, model, mesh)
    lead = jax.process_index() == 0  # only process 0 writes files and prints
    ckpt, state, start, prior_seconds = _open_run_dir(cfg, run_dir, state, lead)
    progress = Progress(cfg.train.steps, start,
                        mode=cfg.logging.progress if verbose and lead else "none")
    if not start:
        progress.message(f"{cfg.name}: {count_params(state.params) / 1e6:.1f}M parameters, "
                         f"{task.items_per_batch:,} {task.item_name} per step"
                         + (f" in {cfg.train.grad_accum} micro-batches"
                            if cfg.train.grad_accum > 1 else ""))
    if resuming and start:
        progress.message(f"resuming {run_dir} from step {start}")
    writer = _open_writer(cfg, run_dir, task, start, resuming) if lead else None
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = jax.jit(make_train_step(graphdef, task, tx, cfg.model.dropout > 0, frozen,
                                         cfg.train.grad_accum),
                         out_shardings=(shardings["params"], shardings["rest"],
                                        shardings["opt_state"], replicated))
    eval_step = jax.jit(make_eval_step(graphdef, task), out_shardings=replicated)
    rows = process_rows(cfg.data.batch_size, mesh)
    batch_of = lambda step: put_batch(task.train_batch(step, rows), mesh, cfg.data.batch_size)
    t0 = time.perf_counter()
    if start < cfg.train.steps:
        train_step = _compile(train_step, (state.params, state.rest, state.opt_state,
                                           state.rng, batch_of(start), np.int32(start)),
                              step_bytes)
    compile_seconds = time.perf_counter() - t0

    def step_fn(state: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
        params, rest, opt_state, metrics = train_step(state.params, state.rest, state.opt_state,
                                                      state.rng, batch_of(step), np.int32(step))
        return TrainState(params, rest, opt_state, state.rng), metrics

    checkpoints = _Checkpoints(ckpt, cfg, task.items_per_batch, prior_seconds, start)
    interval = _IntervalScalars(task, schedule)
    trainer = _make_trainer(cfg, task, interval, step_fn, checkpoints, graphdef, state, mesh,
                            eval_step, writer, progress)
    try:
        state = trainer.run(state, start, cfg.train.steps)
        jax.block_until_ready(state.params)
        loop_seconds = checkpoints.loop_seconds()
        val = evaluate(eval_step, state, task, mesh)
        if writer is not None and start < cfg.train.steps:  # a re-evaluation logs nothing
            writer.scalars(cfg.train.steps, {f"val/{k}": v for k, v in val.items()})
            writer.hparams_end()
    finally:
        progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    return _finish(cfg, run_dir, task, state, start, trainer, interval.means, val,
                   loop_seconds, compile_seconds, verbose and lead, lead)


def _open_writer(cfg: Config, run_dir: Path, task: Task, start: int, resuming: bool
                 ) -> TensorBoardWriter | None:
    if not cfg.logging.tensorboard:
        return None
    # A restarted run hides the events its predecessor wrote after the checkpoint.
    writer = TensorBoardWriter(run_dir, purge_step=start + 1 if resuming else None)
    if not start:
        writer.text("config", to_yaml(cfg))
        writer.hparams_start(to_flat_dict(cfg), [f"val/{k}" for k in task.eval_metric_names])
    return writer


def _make_trainer(cfg: Config, task: Task, interval: _IntervalScalars, step_fn: Callable,
                  checkpoints: _Checkpoints, graphdef: nnx.GraphDef, state: TrainState,
                  mesh: Mesh, eval_step: Callable, writer: TensorBoardWriter | None,
                  progress: Progress) -> Trainer:
    """The loop and its hooks, in the order they run at a log point."""
    trainer = Trainer(step_fn, to_host, log_every=cfg.logging.log_every)
    trainer.add_hook(_stop_on_non_finite(checkpoints))
    trainer.add_hook(interval)
    changes = _snapshot_changes(graphdef, state, mesh)
    if changes is not None:
        trainer.add_hook(changes)

    def validate(info: StepInfo) -> None:
        if not info.last:  # the final evaluation runs after the loop
            info.scalars.update({f"val/{k}": v
                                 for k, v in evaluate(eval_step, info.state, task, mesh).items()})

    trainer.add_hook(validate, every=cfg.train.eval_every)
    if writer is not None:
        trainer.add_hook(lambda info: writer.scalars(info.step, info.scalars))
    trainer.add_hook(lambda info: progress.update(info.step, info.scalars))
    trainer.add_hook(checkpoints, every=cfg.checkpoint.every, at_end=True)
    return trainer


def _finish(cfg: Config, run_dir: Path, task: Task, state: TrainState, start: int,
            trainer: Trainer, last_train: dict[str, float], val: dict[str, float],
            loop_seconds: float, compile_seconds: float, verbose: bool, lead: bool
            ) -> dict[str, Any]:
    """The results dict, written to ``results.json`` (a finished run re-evaluated keeps
    the training numbers it wrote); raises when the evaluation is not finite."""
    total = cfg.train.steps
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": total,
        "resumed_from": start,
        "params": count_params(state.params),
        **task.summary(),
        **{k.replace("/", "_"): v for k, v in last_train.items() if k.count("/") == 1},
        **{f"val_{k}": v for k, v in val.items()},
        # Training intervals only (eval and checkpoint saves excluded).
        f"{task.item_name}_per_sec": (trainer.train_steps * task.items_per_batch
                                      / trainer.train_seconds if trainer.train_seconds
                                      else None),
        # The whole step loop over all sessions of the run (restarts lose only the time
        # since their last checkpoint): logging, TensorBoard, eval and checkpoints included.
        "loop_seconds": loop_seconds,
        "compile_seconds": compile_seconds,
    }
    bad = {k: v for k, v in val.items() if not math.isfinite(v)}
    if bad:  # e.g. a checkpoint that restored without error but holds garbage
        raise NonFiniteLossError(f"evaluation of {run_dir} at step {total} gave non-finite "
                                 f"{', '.join(f'val_{k}={v}' for k, v in bad.items())}; "
                                 "results.json left as it was")
    results_file = run_dir / "results.json"
    if start >= total and results_file.is_file():
        # A finished run re-evaluated has no training numbers of its own (loss, throughput,
        # compile time): keep the ones the run wrote, refresh what this evaluation measured.
        try:
            earlier = json.loads(results_file.read_text())
        except (OSError, ValueError):
            earlier = {}
        results = {**results, **earlier, "resumed_from": start,
                   **{k: v for k, v in results.items() if k.startswith("val_")}}
    if lead:
        write_atomic(results_file, json.dumps(results, indent=2) + "\n")
    if verbose:
        print(format_table([(k, v) for k, v in results.items() if v is not None],
                           title=f"results: {cfg.name}"), flush=True)
    return results
