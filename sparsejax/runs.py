"""The run store: what a run directory holds and how a model comes out of it.

A run directory ``runs/<name>/`` holds ``config.yaml`` (the resolved config),
``checkpoints/<step>/`` (Orbax: params, the non-trainable ``rest``, optimiser state, RNG key,
with fingerprints), ``results.json`` and TensorBoard events. This module resolves
checkpoints, restores the newest intact one, builds a run's initial model (``init_from``
included) and rebuilds a trained one; the trainer, ``prune``, ``compress``, ``sample``,
``compare`` and ``evaluate-analog`` all read runs through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from omegaconf import OmegaConf

from sparsejax.checkpoint import Checkpointer
from sparsejax.config import Config, config_diff, from_dict, to_flat_dict, to_yaml
from sparsejax.errors import CheckpointError, ConfigError, RunDirError
from sparsejax.hf import is_hf_dir, load_hf_model
from sparsejax.nn import TransformParam, apply_rules, param_name, transform_slots
from sparsejax.optim import build_optimizer
from sparsejax.tasks import build_model
from sparsejax.transforms import Calibration, GramCalibration

__all__ = ["RESUMABLE_KEYS", "TrainState", "carry_calibrated_state", "count_params", "init_model",
           "init_model_with_source", "load_model", "load_params_into", "prepare_run_dir",
           "read_saved_config", "resolve_checkpoint", "resolve_run_dir", "restore_newest_intact",
           "save_step_zero", "staged_directory", "uncalibrated_layers", "write_atomic",
           "write_step_zero_run"]


# Keys that may change between a run and its resumption without changing what it computes.
RESUMABLE_KEYS = ("logging.log_every", "logging.progress", "logging.tensorboard",
                  "train.grad_accum",  # the same update, in micro-batches
                  "checkpoint.keep", "checkpoint.async_save",
                  # a run may continue on another mesh (checkpoints are resharded on restore)
                  "mesh.data", "mesh.fsdp", "mesh.tensor")


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
        name = param_name(path)
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
    (:class:`~sparsejax.transforms.Calibration`: post-training pruning, whose masks
    nothing recomputes) from the transform of the same method at the same layer and stage
    of ``source``. Returns the copied paths."""
    found = {(path, stage): slot for path, _, stage, slot in transform_slots(source)}
    copied = []
    for path, _, stage, slot in transform_slots(model):
        other = found.get((path, stage))
        if (not isinstance(slot.spec, Calibration) or other is None
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
            if isinstance(slot.spec, GramCalibration)
            and not slot.spec.is_calibrated(slot.view(None).state)]


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
    """Rebuild the model of a run directory from its checkpoint (latest, or ``step``), or
    load a Hugging Face model directory (``sparsejax.hf``; its one checkpoint is step 0).

    Returns ``(model, config, step)``; the model holds the trained parameters and the
    non-trainable state (e.g. S-STE's beta) exactly as saved, in training mode (call
    ``model.eval()`` for inference: MaskLLM layers then use their argmax masks). Raises
    :class:`~sparsejax.errors.CheckpointError` (one line) when the run directory or the
    checkpoint is missing or cannot be restored.
    """
    run_dir = Path(run_dir)
    if is_hf_dir(run_dir):  # a Hugging Face model directory: one checkpoint, step 0
        if step not in (None, 0):
            raise CheckpointError(f"{run_dir} is a Hugging Face model: it has no step {step}")
        model, cfg = load_hf_model(run_dir)
        return model, cfg, 0
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


def read_saved_config(config_file: Path) -> Config:
    """The resolved config a run wrote to ``config.yaml``; raises :class:`ConfigError`."""
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


def write_atomic(path: Path, text: str) -> None:
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


def save_step_zero(cfg: Any, model: nnx.Module, directory: Path) -> None:
    """The pruned model as the step-0 checkpoint of a run (fresh optimiser state), in
    the layout the trainer writes and resumes from."""
    tx, _, _ = build_optimizer(cfg, model)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(params, rest, tx.init(params),
                       jax.random.key_data(jax.random.key(cfg.train.seed)))
    ckpt = Checkpointer(directory / "checkpoints", async_save=False)
    try:
        ckpt.save(0, state.as_dict(), {"step": 0, "data_position": 0,
                                       "seed": cfg.train.seed, "items_seen": 0,
                                       "loop_seconds": 0.0})
    finally:
        ckpt.close()


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A fresh, uniquely named directory beside ``out`` (never a path a user made) to write
    a multi-file output into; published as ``out`` by one rename when the block ends, and
    removed when it raises, so an interruption leaves no half output at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield partial
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_step_zero_run(out: Path, cfg: Any, model: nnx.Module, report_name: str,
                        report: dict[str, Any], what: str) -> None:
    """Write ``model`` as the run directory ``out``: the step-0 checkpoint, ``cfg`` as
    ``config.yaml``, ``report`` as ``report_name`` and ``results.json`` with the
    validation metrics ``report["after"]`` (and ``report["before"]`` as
    ``val_<metric>_before_<what>``). Written to a fresh ``.<out>.*.partial`` beside it
    first, then renamed, so an interrupted write leaves no half run at ``out``."""
    with staged_directory(out) as partial:
        save_step_zero(cfg, model, partial)
        (partial / "config.yaml").write_text(to_yaml(cfg))
        (partial / report_name).write_text(json.dumps(report, indent=2) + "\n")
        (partial / "results.json").write_text(json.dumps(
            {"run_dir": str(out), "steps": 0,
             **{f"val_{k}": v for k, v in report["after"].items()},
             **{f"val_{k}_before_{what}": v for k, v in report["before"].items()}},
            indent=2) + "\n")
