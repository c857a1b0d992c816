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
from collections.abc import Callable, Sequence
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
from sparsejax.nn import (
    apply_rules,
    layer_metrics,
    mask_choice_changes,
    mask_choices,
    mask_layers,
    mask_training_options,
    regularization_loss,
)
from sparsejax.reporting import Progress, TensorBoardWriter, format_table
from sparsejax.sharding import (
    check_transform_sharding,
    make_mesh,
    process_rows,
    put_batch,
    put_replicated,
    put_state,
    state_shardings,
    to_host,
)
from sparsejax.tasks import Task, build_model, build_task

__all__ = ["NonFiniteLossError", "RunDirError", "TrainState", "init_model", "load_model",
           "evaluate_model", "make_optimizer", "make_train_step", "resolve_checkpoint", "run"]

# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_KEYS = ("logging.log_every", "logging.progress", "logging.tensorboard",
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


def _is_mask_logit(path: tuple[Any, ...]) -> bool:
    return any(getattr(k, "key", None) == "mask_logits" for k in path)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params: nnx.State | None = None,
                   *, mask_lr_mult: float = 1.0, freeze_weights: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio``,
    global-norm gradient clipping, and weight decay on matrices only (ndim >= 2).

    When ``params`` holds MaskLLM logits (:class:`~sparsejax.nn.MaskLogits`), they get
    their own Adam with the learning rate scaled by ``mask_lr_mult`` (the reference recipe
    uses 10) and no weight decay; with ``freeze_weights`` every other parameter is frozen
    (no update, no optimiser state). Deviation: the reference code puts its 2-D gate tensor
    in the decayed group (weight decay 0.1 in its recipe); decay pulls every group back
    towards the uniform choice, against the tau/kappa annealing, so we leave it out.
    Returns ``(optimizer, schedule of the base learning rate)``."""
    # A warm-up longer than the run (train.steps=20 on a config made for 600) is cut to
    # the run, so that a short smoke run of any config works.
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=min(cfg.warmup_steps, total_steps - 1),
        decay_steps=total_steps, end_value=cfg.lr * cfg.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    has_logits = params is not None and any(
        _is_mask_logit(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
    if has_logits:
        logit_adam = optax.adam(lambda step: schedule(step) * mask_lr_mult, b1=cfg.b1,
                                b2=cfg.b2, eps=cfg.eps)
        weights = optax.set_to_zero() if freeze_weights else adamw
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "mask_logits" if _is_mask_logit(path) else "weights", params)
        adamw = optax.multi_transform({"mask_logits": logit_adam, "weights": weights}, labels)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule
    return adamw, schedule


def build_optimizer(cfg: Config, model: nnx.Module
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """:func:`make_optimizer` for ``cfg`` and the parameters of ``model`` (after rules)."""
    freeze, mult = mask_training_options(model)
    return make_optimizer(cfg.optimizer, cfg.train.steps, nnx.state(model, nnx.Param),
                          mask_lr_mult=mult, freeze_weights=freeze)


def make_train_step(graphdef: nnx.GraphDef, task: Task, tx: optax.GradientTransformation,
                    use_dropout: bool, freeze_weights: bool = False):
    """The pure train step ``(params, rest, opt_state, rng, batch, step) ->
    (params, rest, opt_state, metrics)``; ``metrics['finite']`` is False when the loss,
    the gradient or the updated parameters hold a NaN/Inf.

    The differentiated objective is the task loss plus the layers' regularisers
    (:func:`~sparsejax.nn.regularization_loss`; ``metrics['loss']`` is the task loss
    alone). ``freeze_weights``: only MaskLLM logits get a gradient (the others' are zeroed
    before clipping, so XLA drops their weight-gradient GEMMs)."""

    def train_step(params, rest, opt_state, rng, batch, step):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step) if use_dropout else None

        def loss_of(p):
            # copy=True: layers may update their state (e.g. MVUE draw counters) inside the
            # grad trace, which NNX only allows on variables created in that trace.
            model = nnx.merge(graphdef, p, rest, copy=True)
            loss, aux = task.loss(model, batch, key)
            objective = loss
            if mask_layers(model):
                aux = {**aux, "regularizer": regularization_loss(model)}
                objective = loss + aux["regularizer"]
            return objective, (loss, aux, nnx.split(model, nnx.Param, ...)[2])

        (_, (loss, aux, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        if freeze_weights:
            grads = jax.tree_util.tree_map_with_path(
                lambda path, g: g if _is_mask_logit(path) else jnp.zeros_like(g), grads)
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
    same path. Parameters ``source`` lacks keep their values only when they are MaskLLM
    logits (new state of the target's rules); any other missing path or shape mismatch
    raises :class:`ConfigError` naming it. Returns the copied paths."""
    target = nnx.state(model, nnx.Param)
    loaded = dict(jax.tree_util.tree_leaves_with_path(nnx.state(source, nnx.Param)))
    copied, values = [], []
    for path, value in jax.tree_util.tree_leaves_with_path(target):
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        if path not in loaded:
            if not _is_mask_logit(path):
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
    S-STE's beta and MaskLLM's prior see the loaded weights). Raises :class:`ConfigError`
    when a rule cannot apply or the init checkpoint does not fit."""
    model = build_model(cfg, nnx.Rngs(params=cfg.train.seed))
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
    return model


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
        tx, _ = build_optimizer(cfg, model)
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
        model = init_model(cfg, load_init=not has_checkpoint)
    mesh = make_mesh(cfg.mesh)
    check_transform_sharding(model, mesh)
    with jax.set_mesh(mesh):  # models pin their activations to this mesh (shard_batch)
        step_bytes: list[int] = []  # the compiled step's estimate, once known
        with _out_of_memory_in_one_line(cfg, "training", step_bytes):
            return _train_on_mesh(cfg, run_dir, resuming, task, model, mesh, verbose,
                                  step_bytes)


def _train_on_mesh(cfg: Config, run_dir: Path, resuming: bool, task: Task,
                   model: nnx.Module, mesh: Mesh, verbose: bool,
                   step_bytes: list[int]) -> dict[str, Any]:
    """The body of :func:`run` once the run dir is checked and the mesh is built; appends
    the compiled step's memory estimate (bytes) to ``step_bytes``."""
    freeze_weights, _ = mask_training_options(model)
    tx, schedule = build_optimizer(cfg, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    host_state = TrainState(params=params, rest=rest, opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(cfg.train.seed))).as_dict()
    shardings = state_shardings(host_state, mesh)
    state = TrainState(**put_state(host_state, shardings))
    rows = process_rows(cfg.data.batch_size, mesh)
    lead = jax.process_index() == 0  # only process 0 writes files and prints

    if jax.process_count() > 1:  # every process has read the run dir before it changes
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("sparsejax: run dir checked")
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    start = 0
    prior_seconds = 0.0  # step-loop time of earlier sessions of this run
    if ckpt.all_steps():  # restored onto this run's mesh, whatever mesh saved it
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if lead else None
        restored, meta, start = restore_newest_intact(ckpt, state.as_dict(), say)
        state = TrainState(**restored)
        prior_seconds = float(meta.get("loop_seconds", 0.0))
    if lead:  # after the restore: a run with no intact checkpoint is left as it was
        _write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    total = cfg.train.steps
    mode = cfg.logging.progress if verbose and lead else "none"
    progress = Progress(total, start, mode=mode)
    if resuming and start:
        progress.message(f"resuming {run_dir} from step {start}")

    writer = None
    if cfg.logging.tensorboard and lead:
        # A restarted run hides the events its predecessor wrote after the checkpoint.
        writer = TensorBoardWriter(run_dir, purge_step=start + 1 if resuming else None)
        if not start:
            writer.text("config", to_yaml(cfg))
            writer.hparams_start(to_flat_dict(cfg),
                                 [f"val/{k}" for k in task.eval_metric_names])

    use_dropout = cfg.model.dropout > 0
    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = jax.jit(make_train_step(graphdef, task, tx, use_dropout, freeze_weights),
                         out_shardings=(shardings["params"], shardings["rest"],
                                        shardings["opt_state"], replicated))
    eval_step = jax.jit(make_eval_step(graphdef, task), out_shardings=replicated)
    # MaskLLM: which candidate each group would pick, compared between log points.
    choices_of = jax.jit(lambda p, r: mask_choices(nnx.merge(graphdef, p, r)),
                         out_shardings=replicated)
    last_choices = to_host(choices_of(state.params, state.rest))

    def batch_of(step: int) -> dict[str, jax.Array]:
        return put_batch(task.train_batch(step, rows), mesh, cfg.data.batch_size)

    info = task.summary()
    items = task.items_per_batch
    rate_key = f"throughput/{task.item_name}_per_sec"

    # Compile ahead so that throughput excludes compilation.
    t0 = time.perf_counter()
    if start < total:
        step_args = (state.params, state.rest, state.opt_state, state.rng,
                     batch_of(start), np.int32(start))
        train_step = train_step.lower(*step_args).compile()
        memory = train_step.memory_analysis()
        if memory is not None:
            step_bytes.append(int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                  + memory.output_size_in_bytes))
    compile_seconds = time.perf_counter() - t0

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_saved = start if start else None
    last_train: dict[str, float] = {}
    train_seconds, train_items = 0.0, 0
    interval_start, interval_steps = time.perf_counter(), 0

    def save(step: int) -> None:
        nonlocal last_saved
        ckpt.save(step, state.as_dict(),
                  {"step": step, "data_position": step, "seed": cfg.train.seed,
                   "items_seen": step * items,
                   "loop_seconds": prior_seconds + time.perf_counter() - loop_start})
        last_saved = step

    loop_start = time.perf_counter()
    try:
        for step in range(start, total):
            params, rest, opt_state, metrics = train_step(
                state.params, state.rest, state.opt_state, state.rng,
                batch_of(step), np.int32(step))
            state = TrainState(params, rest, opt_state, state.rng)
            pending.append((step, metrics))
            interval_steps += 1
            done = step + 1
            do_eval = done % cfg.train.eval_every == 0 and done != total
            do_save = done % cfg.checkpoint.every == 0 or done == total
            if done % cfg.logging.log_every and not (do_eval or do_save or done == total):
                continue

            # Sync point: every pending step is checked before anything is saved.
            host = to_host([m for _, m in pending])
            seconds = time.perf_counter() - interval_start
            for (s, _), m in zip(pending, host, strict=True):
                if not m["finite"]:
                    raise NonFiniteLossError(
                        f"non-finite loss, gradient or parameters at step {s + 1} "
                        f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}); "
                        "stopped. Last good checkpoint: "
                        + (f"step {last_saved} in {ckpt.directory}" if last_saved else "none"))
            # Interval means; keys that carry their own namespace (sparsity/...) keep it.
            last_train = {(k if "/" in k else f"train/{k}"): float(np.mean([m[k] for m in host]))
                          for k in host[0] if k != "finite"}
            train_seconds += seconds
            train_items += interval_steps * items
            scalars = {**last_train, "train/lr": float(schedule(step)),
                       rate_key: interval_steps * items / seconds}
            if last_choices:
                choices = to_host(choices_of(state.params, state.rest))
                scalars.update(mask_choice_changes(last_choices, choices))
                last_choices = choices
            if "train/loss" in scalars and task.item_name == "tokens":
                scalars[f"train/{task.bits_name}"] = scalars["train/loss"] / math.log(2)
            pending.clear()

            if do_eval:
                val = evaluate(eval_step, state, task, mesh)
                scalars.update({f"val/{k}": v for k, v in val.items()})
            if writer is not None:
                writer.scalars(done, scalars)
            progress.update(done, scalars)
            if do_save:
                save(done)
            interval_start, interval_steps = time.perf_counter(), 0

        if last_saved != total:
            save(total)
        jax.block_until_ready(state.params)
        loop_seconds = prior_seconds + time.perf_counter() - loop_start
        val = evaluate(eval_step, state, task, mesh)
        if writer is not None and start < total:  # a finished run re-evaluated logs nothing
            writer.scalars(total, {f"val/{k}": v for k, v in val.items()})
            writer.hparams_end()
    finally:
        progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()

    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": total,
        "resumed_from": start,
        "params": count_params(state.params),
        **{k: v for k, v in info.items()},
        **{k.replace("/", "_"): v for k, v in last_train.items() if k.count("/") == 1},
        **{f"val_{k}": v for k, v in val.items()},
        # Training intervals only (eval and checkpoint saves excluded).
        f"{task.item_name}_per_sec": train_items / train_seconds if train_seconds else None,
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
    if verbose and lead:
        print(format_table([(k, v) for k, v in results.items() if v is not None],
                           title=f"results: {cfg.name}"), flush=True)
    return results

