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
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.checkpoint import Checkpointer
from sparsejax.config import (
    CheckpointError,
    Config,
    ConfigError,
    OptimizerConfig,
    config_diff,
    from_dict,
    to_flat_dict,
    to_yaml,
)
from sparsejax.loop import StepInfo, Trainer
from sparsejax.nn import (
    TransformParam,
    apply_rules,
    apply_updates,
    has_updates,
    layer_metrics,
    loss_terms,
    param_labels,
    snapshot_changes,
    snapshots,
    transform_slots,
)
from sparsejax.reporting import Progress, TensorBoardWriter, format_table
from sparsejax.sharding import (
    check_transform_sharding,
    logical_axes,
    make_mesh,
    process_rows,
    put_batch,
    put_replicated,
    put_state,
    state_shardings,
    to_host,
)
from sparsejax.tasks import Task, build_model, build_task
from sparsejax.transforms import ParamGroup

__all__ = ["NonFiniteLossError", "RunDirError", "TrainState", "init_model", "load_model",
           "evaluate_model", "make_optimizer", "make_train_step", "resolve_checkpoint", "run"]

# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_KEYS = ("logging.log_every", "logging.progress", "logging.tensorboard",
                  "train.grad_accum",  # the same update, in micro-batches
                  "checkpoint.keep", "checkpoint.async_save",
                  # a run may continue on another mesh (checkpoints are resharded on restore)
                  "mesh.data", "mesh.fsdp", "mesh.tensor")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the run stopped."""


class OutOfMemoryError(ConfigError):
    """The model or its compiled step does not fit in the device's memory; the message is
    one line with the parameter count and, once compiled, the step's memory estimate."""

    kind = "out of memory"


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


class RunDirError(ConfigError):
    """The run directory holds something this run must not overwrite."""

    kind = "run directory error"


@dataclass
class TrainState:
    """Everything that evolves during training: a pytree Orbax saves as it is."""

    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data of the base training key

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "rest": self.rest, "opt_state": self.opt_state,
                "rng": self.rng}


# --------------------------------------------------------------------------- building blocks


def make_optimizer(cfg: OptimizerConfig, total_steps: int, labels: Any = None,
                   groups: Mapping[str, ParamGroup] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio``,
    global-norm gradient clipping, and weight decay on matrices only (ndim >= 2).

    ``labels`` / ``groups`` (from :func:`sparsejax.nn.param_labels`): the partition the
    transforms ask for. Parameters labelled with a group get their own Adam with the
    learning rate times the group's ``lr_mult`` and no weight decay (MaskLLM's logits;
    the reference recipe uses x10); with a group's ``freeze_others`` every ``weights``
    parameter is frozen (no update, no optimiser state). Deviation: the MaskLLM reference
    code puts its 2-D gate tensor in the decayed group (weight decay 0.1 in its recipe);
    decay pulls every group back towards the uniform choice, against the tau/kappa
    annealing, so we leave it out. Returns ``(optimizer, schedule of the base rate)``."""
    # A warm-up longer than the run (train.steps=20 on a config made for 600) is cut to
    # the run, so that a short smoke run of any config works.
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=min(cfg.warmup_steps, total_steps - 1),
        decay_steps=total_steps, end_value=cfg.lr * cfg.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)
    if groups:
        frozen = any(g.freeze_others for g in groups.values())
        parts = {"weights": optax.set_to_zero() if frozen else tx}
        for name, group in groups.items():
            parts[name] = optax.adam(lambda step, g=group: schedule(step) * g.lr_mult,
                                     b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        tx = optax.multi_transform(parts, labels)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx), schedule
    return tx, schedule


def build_optimizer(cfg: Config, model: nnx.Module
                    ) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
    """:func:`make_optimizer` for ``cfg`` and the transforms of ``model`` (after rules);
    also returns the labels to freeze in the train step (None when nothing is frozen)."""
    labels, groups = param_labels(model)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps, labels, groups)
    frozen = any(g.freeze_others for g in groups.values())
    return tx, schedule, labels if frozen else None


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

    def forward_backward(params, rest, batch, key):
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

    def accumulate(params, rest, batch, key):
        micro = jax.tree.map(lambda x: jnp.swapaxes(
            x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1), batch)

        def body(carry, inputs):
            index, part = inputs
            part_key = None if key is None else jax.random.fold_in(key, index)
            grads, loss, aux, new_rest = forward_backward(params, rest, part, part_key)
            sums = jax.tree.map(jnp.add, carry[0], (grads, loss, aux))
            return (sums, new_rest), None

        first = jax.eval_shape(forward_backward, params, rest,
                               jax.tree.map(lambda x: x[0], micro), key)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), first[:3])
        (sums, new_rest), _ = jax.lax.scan(body, (zeros, rest),
                                           (jnp.arange(grad_accum), micro))
        grads, loss, aux = jax.tree.map(lambda x: x / grad_accum, sums)
        return grads, loss, aux, new_rest

    def train_step(params, rest, opt_state, rng, batch, step):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step) if use_dropout else None
        if grad_accum > 1:
            grads, loss, aux, new_rest = accumulate(params, rest, batch, key)
        else:
            grads, loss, aux, new_rest = forward_backward(params, rest, batch, key)
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


def make_eval_step(graphdef: nnx.GraphDef, task: Task):
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()  # inference form of stochastic transforms (MaskLLM: argmax masks)
        return task.eval_sums(model, batch)

    return eval_step


def evaluate(eval_step, state: TrainState, task: Task, mesh=None) -> dict[str, float]:
    """Validation metrics over the task's fixed batches (replicated over ``mesh`` when
    given, so every process evaluates the same)."""
    sums: dict[str, float] = {}
    for batch in task.eval_batches():
        if mesh is not None:
            batch = put_replicated(batch, mesh)
        for k, v in to_host(eval_step(state.params, state.rest, batch)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: float(v) for k, v in task.finish_eval(sums).items()}


def resolve_checkpoint(path: str | Path, step: int | None = None
                       ) -> tuple[Path, int | None]:
    """``(run_dir, step)`` of a run directory (``step`` as given: None = latest) or of a
    checkpoint directory ``<run>/checkpoints/<step>``."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    return path, step


def load_params_into(model: nnx.Module, source: nnx.Module, origin: str) -> list[str]:
    """Copy, in place, every parameter of ``source`` into the parameter of ``model`` at the
    same path. Parameters ``source`` lacks keep their values only when they belong to a
    transform of the target's rules (:class:`~sparsejax.nn.TransformParam`: new state,
    e.g. MaskLLM's logits); any other missing path or shape mismatch raises
    :class:`ConfigError` naming it. Returns the copied paths."""
    target = nnx.state(model, nnx.Param)
    own = {path for path, _ in jax.tree_util.tree_leaves_with_path(
        nnx.state(model, TransformParam))}
    loaded = dict(jax.tree_util.tree_leaves_with_path(nnx.state(source, nnx.Param)))
    copied, values = [], []
    for path, value in jax.tree_util.tree_leaves_with_path(target):
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        if path not in loaded:
            if path not in own:
                raise ConfigError(f"train.init_from {origin} has no parameter {name}")
            values.append(value)
            continue
        if loaded[path].shape != value.shape:
            raise ConfigError(f"train.init_from {origin}: parameter {name} has shape "
                              f"{tuple(loaded[path].shape)}, this model {tuple(value.shape)}")
        values.append(loaded[path])
        copied.append(name)
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(target), values))
    return copied


def carry_calibrated_state(model: nnx.Module, source: nnx.Module) -> list[str]:
    """Copy, in place, the params and state of every calibrated transform of ``model``
    (:attr:`~sparsejax.transforms.Transform.calibrated`: post-training pruning, whose masks
    nothing recomputes) from the transform of the same method at the same layer and stage
    of ``source``. Returns the copied paths."""
    found = {(path, stage): slot for path, _, stage, slot in transform_slots(source)}
    copied = []
    for path, _, stage, slot in transform_slots(model):
        other = found.get((path, stage))
        if (not slot.spec.calibrated or other is None
                or (other.spec.kind, other.spec.method) != (slot.spec.kind, slot.spec.method)):
            continue
        for kind in ("params", "state"):
            theirs = getattr(other, kind)
            for name, variable in getattr(slot, kind).items():
                if name in theirs and theirs[name][...].shape == variable.shape:
                    variable[...] = theirs[name][...]
                    copied.append(f"{path}/{stage}/{kind}/{name}")
    return copied


def uncalibrated_layers(model: nnx.Module) -> list[str]:
    """Paths of the layers whose calibrated transform has not been calibrated (a
    ``prune`` rule on weights that ``sparsejax prune`` never saw)."""
    return [path for path, _, _, slot in transform_slots(model)
            if slot.spec.calibrated and "pruned" in slot.state
            and not bool(slot.state["pruned"][...])]


def evaluate_model(model: nnx.Module, cfg: Config, task: Task | None = None
                   ) -> dict[str, float]:
    """Validation metrics of ``model`` (in its inference form: ``model.eval()`` is applied
    to a copy) on the fixed validation batches of ``cfg``'s task, as the trainer reports
    them (``loss``, ``bpb`` / ``accuracy``, ...)."""
    task = task or build_task(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(make_eval_step(graphdef, task))
    return evaluate(eval_step, TrainState(params, rest, None, None), task)


def init_model(cfg: Config, load_init: bool = True) -> nnx.Module:
    """The initial model of ``cfg``: built from the seed, its parameters replaced by those
    of ``train.init_from`` when set (and ``load_init``), then configured by its rules (so
    S-STE's beta and MaskLLM's prior see the loaded weights; the masks and factors of
    post-training pruning are carried over from the source, :func:`carry_calibrated_state`).
    Raises :class:`ConfigError` when a rule cannot apply or the init checkpoint does not
    fit."""
    return init_model_with_source(cfg, load_init)[0]


def init_model_with_source(cfg: Config, load_init: bool = True
                           ) -> tuple[nnx.Module, nnx.Module | None]:
    """:func:`init_model` and the ``train.init_from`` model it loaded (None when there is
    none): the teacher :func:`calibrate_from_teacher` calibrates against, restored once."""
    model = build_model(cfg, nnx.Rngs(params=cfg.train.seed))
    source = None
    if cfg.train.init_from and load_init:
        run_dir, step = resolve_checkpoint(cfg.train.init_from)
        try:
            source, _, _ = load_model(run_dir, step)
        except ConfigError as err:  # keeps its kind: a missing checkpoint is no config error
            raise type(err)(f"train.init_from: {err}") from None
        load_params_into(model, source, str(cfg.train.init_from))
    try:
        apply_rules(model, cfg.rules, total_steps=cfg.train.steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if source is not None:  # masks of post-training pruning: set up above, then carried
        carry_calibrated_state(model, source)
    return model, source


def load_model(run_dir: str | Path, step: int | None = None) -> tuple[nnx.Module, Config, int]:
    """Rebuild the model of a run directory from its checkpoint (latest, or ``step``).

    Returns ``(model, config, step)``; the model holds the trained parameters and the
    non-trainable state (e.g. S-STE's beta) exactly as saved, in training mode (call
    ``model.eval()`` for inference: MaskLLM layers then use their argmax masks). Raises
    :class:`~sparsejax.config.CheckpointError` (one line) when the run directory or the
    checkpoint is missing or cannot be restored.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not run_dir.exists():
        raise CheckpointError(f"checkpoint not found: {run_dir}")
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = read_saved_config(config_file)
    model = init_model(cfg, load_init=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise CheckpointError(f"{run_dir}: no checkpoint at step {step} "
                                  f"(have {ckpt.all_steps()})")
        tx, _, _ = build_optimizer(cfg, model)
        target = TrainState(params, rest, tx.init(params),
                            jax.random.key_data(jax.random.key(0))).as_dict()
        state, _ = ckpt.restore(step, target)  # CheckpointError when unreadable or corrupt
    finally:
        ckpt.close()
    return nnx.merge(graphdef, state["params"], state["rest"]), cfg, step


def count_params(params: nnx.State) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# --------------------------------------------------------------------------- run directory


def read_saved_config(config_file: Path) -> Config:
    """The resolved config a run wrote to ``config.yaml``; raises :class:`ConfigError`."""
    from omegaconf import OmegaConf

    return from_dict(OmegaConf.to_container(OmegaConf.load(config_file)))


def resolve_run_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Check that ``run_dir`` is new or holds this same run. Returns True when it holds a
    run to resume. Writes nothing; raises :class:`RunDirError`."""
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        try:
            saved = read_saved_config(config_file)
        except ConfigError as err:
            raise RunDirError(f"{config_file} is not a valid sparsejax config ({err}); "
                              "use another run_dir") from None
        changed = [k for k in config_diff(saved, cfg)
                   if k not in RESUMABLE_KEYS and k != "run_dir"]
        if changed:
            old, new = to_flat_dict(saved), to_flat_dict(cfg)
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
            raise RunDirError(f"{run_dir} holds a run with a different config ({detail}); "
                              "set another name= or run_dir= to start a new run")
        return True
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(f"{run_dir} exists and is not a sparsejax run directory "
                          "(no config.yaml); set another name= or run_dir=")
    return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def restore_newest_intact(ckpt: Checkpointer, target: dict[str, Any],
                          say: Callable[[str], None] | None
                          ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Restore the newest checkpoint that reads back intact (fingerprints match, data
    position consistent); ``(state, meta, step)``. Newer corrupt or unreadable ones are set
    aside (renamed ``<step>.corrupt``, never deleted; by process 0, which ``say``s one line
    each). Raises :class:`CheckpointError` when none is intact, renaming nothing."""
    failures: list[tuple[int, CheckpointError]] = []
    for step in reversed(ckpt.all_steps()):
        try:
            state, meta = ckpt.restore(step, target)
            if meta.get("data_position") != step:
                raise CheckpointError(f"checkpoint {ckpt.step_path(step)} is corrupt: it "
                                      f"records data position {meta.get('data_position')}")
        except CheckpointError as err:
            failures.append((step, err))
            continue
        for bad, err in failures:
            if say is not None:
                moved = ckpt.set_aside(bad)
                say(f"sparsejax: {err}; set aside as {moved.name}, resuming from step {step}")
        return state, meta, step
    raise CheckpointError(f"no intact checkpoint in {ckpt.directory} "
                          f"({len(failures)} tried; newest: {failures[0][1]})")


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
             if slot.spec.requires_init_from]
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


def calibrate_from_teacher(cfg: Config, model: nnx.Module, teacher: nnx.Module,
                           verbose: bool = False) -> None:
    """Calibrate, in place, the attention transforms that start from a trained model
    (gain-cell attention's affines, CSKV's ASVD factors; ``sparsejax.adapt``) against
    ``teacher`` (the ``train.init_from`` model, :func:`init_model_with_source`), on the
    first training batches of the run (``calib_batches`` of the transform, the largest
    asked), as a fresh run does before its first step."""
    from sparsejax.adapt import calibrate_attention, uncalibrated_attention
    from sparsejax.posttrain import calibration_batches

    paths = uncalibrated_attention(model)
    if not paths:
        return
    count = max(slot.spec.calib_batches for path, _, _, slot in transform_slots(model)
                if path in paths)
    start = time.perf_counter()
    try:
        reports = calibrate_attention(model, teacher, calibration_batches(cfg, count))
    except ValueError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    if verbose:
        matched = (f" (per-head output mean and std of {len(reports)} within "
                   f"{max(r.max_rel_error for r in reports):.1e} of the teacher's std)"
                   if reports else "")
        print(f"calibrated {len(paths)} attention modules from {cfg.train.init_from} "
              f"on {count} batches in {time.perf_counter() - start:.1f} s{matched}")


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
        _write_atomic(run_dir / "config.yaml", to_yaml(cfg))
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
        _write_atomic(results_file, json.dumps(results, indent=2) + "\n")
    if verbose:
        print(format_table([(k, v) for k, v in results.items() if v is not None],
                           title=f"results: {cfg.name}"), flush=True)
    return results
