"""Multi-host start-up: ``jax.distributed.initialize`` from flags or a SLURM allocation.

Every process runs the same command (``sparsejax train CONFIG ...``); after
initialisation ``jax.devices()`` lists the devices of all processes and the trainer's mesh
spans them. Each process feeds its own rows of every batch, only process 0 writes
TensorBoard, ``config.yaml`` and ``results.json``, and all processes take part in the
Orbax checkpoints. On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "slurm_world"]


def slurm_world(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(num_processes, process_id)`` of a multi-task SLURM step, else None."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
        return None
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    return (tasks, int(env["SLURM_PROCID"])) if tasks > 1 else None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_seconds: int = 300) -> bool:
    """Join a multi-process run. With ``coordinator`` (``host:port``), ``num_processes``
    and ``process_id`` given, use them; without, use a SLURM allocation of more than one
    task (JAX reads the coordinator from SLURM); otherwise do nothing. Returns whether
    the process joined a multi-process run. Raises ``ValueError`` for partial flags."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if not any(given) and slurm_world() is None:
        return False
    # CPU collectives across processes (ignored by GPU/TPU backends). Set before any
    # backend starts: querying the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id,
                                   initialization_timeout=timeout_seconds)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_seconds)
    return True
