"""Orbax checkpoints of the training state, plus a small JSON record of the data position.

Layout under ``<run_dir>/checkpoints/<step>/``: ``state`` (an Orbax ``StandardSave`` of
the pytree ``{params, rest, opt_state, rng}``, where ``rest`` holds a model's non-trainable
variables) and ``meta`` (JSON: step, data position, seed, and a fingerprint of every array
leaf). Orbax writes each step into a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoints usable; leftover temporary
directories are removed when the directory is next opened for writing (synchronously:
Orbax's own clean-up runs in a background thread that only its next ``save`` waits for).

Integrity: at save, every leaf's fingerprint - 64 bits of hash over its bytes, computed on
the device where the array lives, plus its shape and dtype - goes into ``meta``; at
restore, the restored leaves are fingerprinted again and compared. Flipped or truncated
bytes, a missing ``state`` directory or an unreadable file raise :class:`CheckpointError`
naming the checkpoint and, where it is one leaf, the leaf. Checkpoints written before
fingerprints existed restore unchecked.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sparsejax.errors import CheckpointError

# Orbax names an unfinished step ``<step>.orbax-checkpoint-tmp[-<timestamp>]``.
_ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"

__all__ = ["Checkpointer", "CheckpointError", "fingerprints", "verify_fingerprints"]

# Odd multipliers (golden-ratio, MurmurHash3 and xxHash constants) of the hash's mixing.
_INDEX_MULT, _MIX_MULT, _LANE_MULT = 0x9E3779B1, 0x85EBCA77, 0x27D4EB2F


def _words(x: jax.Array) -> jax.Array:
    """The bytes of ``x`` as a flat uint32 array (1- and 2-byte items widened, 8-byte
    items split in two)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _leaf_hash(x: jax.Array) -> jax.Array:
    """Two uint32 sums, of ``h_i = mix(word_i xor i * a)`` and of ``(h_i * c) xor i``, where
    ``mix`` (multiply by an odd constant, then xor-shift) and ``* c`` are bijections: any
    change of one word changes both sums. One fused pass over the words (as fast on CPU as
    a plain sum of them: 0.44 s for 1.2 GB here)."""
    words = _words(x)
    index = jnp.arange(words.size, dtype=jnp.uint32)
    h = (words ^ (index * jnp.uint32(_INDEX_MULT))) * jnp.uint32(_MIX_MULT)
    h = h ^ (h >> 15)
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32),
                      jnp.sum((h * jnp.uint32(_LANE_MULT)) ^ index, dtype=jnp.uint32)])


_hash_tree = jax.jit(lambda tree: jax.tree.map(_leaf_hash, tree))


def fingerprints(tree: Any) -> dict[str, dict[str, Any]]:
    """``{leaf path: {"hash", "shape", "dtype"}}`` of a pytree of arrays (one jitted pass
    on the arrays' own devices; only 8 bytes a leaf come to the host)."""
    hashes = jax.device_get(_hash_tree(tree))
    out = {}
    for (path, leaf), (_, h) in zip(jax.tree_util.tree_leaves_with_path(tree),
                                    jax.tree_util.tree_leaves_with_path(hashes), strict=True):
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = {
            "hash": f"{int(h[0]):08x}{int(h[1]):08x}", "shape": list(leaf.shape),
            "dtype": str(leaf.dtype)}
    return out


def verify_fingerprints(tree: Any, expected: dict[str, dict[str, Any]], where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` and the first leaf of ``tree`` whose
    fingerprint differs from ``expected`` (leaves ``expected`` lacks are not checked)."""
    for name, got in fingerprints(tree).items():
        want = expected.get(name)
        if want is not None and want != got:
            raise CheckpointError(
                f"{where} is corrupt: leaf '{name}' does not match the fingerprint written "
                f"at save ({want['hash']} {want['dtype']}{want['shape']}, read "
                f"{got['hash']} {got['dtype']}{got['shape']})")


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
        """Start saving ``state`` (a pytree of arrays) and ``meta`` (JSON-able) at ``step``,
        with the fingerprints of ``state``'s leaves added to ``meta``; returns once the
        arrays are copied to host when saving asynchronously."""
        meta = {**meta, "fingerprints": fingerprints(state)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the pytree saved at ``step`` into the structure (and shardings) of
        ``target`` and check it against the fingerprints saved with it; returns
        ``(state, meta)``. Raises :class:`CheckpointError` (one line) when the checkpoint
        is missing, unreadable or corrupt."""
        where = f"checkpoint {self.step_path(step)}"
        if not self.step_path(step).is_dir():
            raise CheckpointError(f"{where} not found (have steps {self.all_steps()})")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax / TensorStore: truncated, missing or garbled files
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(f"{where} cannot be read: {type(err).__name__}: "
                                  f"{first[:200]}") from None
        meta = dict(restored.meta)
        verify_fingerprints(restored.state, meta.get("fingerprints", {}), where)
        return restored.state, meta

    def set_aside(self, step: int) -> Path:
        """Rename the checkpoint of ``step`` to ``<step>.corrupt`` (``.corrupt-2``, ... if
        taken) so that it is no longer a step; nothing is deleted. Returns the new path."""
        source = self.step_path(step)
        target, n = source.with_name(f"{step}.corrupt"), 1
        while target.exists():
            n += 1
            target = source.with_name(f"{step}.corrupt-{n}")
        source.rename(target)
        self.reload()
        return target

    def reload(self) -> None:
        """Re-read the step directories (after one was renamed or removed outside Orbax)."""
        self._manager.reload()

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
