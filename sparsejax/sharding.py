"""Device meshes and shardings of the training state (``jax.sharding``, GSPMD).

A config's ``mesh: {data, fsdp, tensor}`` block builds a ``Mesh`` with those named axes.
Every array of the training state (parameters, the layers' non-trainable state, the
optimiser state) gets a ``PartitionSpec`` from the *logical* axes its variable was created
with (``logical_axes`` metadata, set where the model creates its parameters: ``Linear(...,
axes=("embed", "mlp"))``, and by transforms for their own parameters), mapped to mesh axes
by the one table :data:`LOGICAL_AXIS_RULES`. Optimiser moments sit under the paths of their
parameters and follow them. Batches are split along ``("data", "fsdp")``; anything without
logical axes is replicated. The compiler (GSPMD) inserts the collectives. This module names
no model and no method.

Transforms stay exact under sharding: :func:`check_transform_sharding` asks every
transform which runs of rows along a kernel's axis 0 must stay on one device (N:M groups,
quantisation blocks) and refuses a mesh that would split them, naming the layer and the
mesh axis to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.config import ConfigError, MeshConfig
from sparsejax.nn import BATCH_AXES, Linear, named_layers

__all__ = ["BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding",
           "check_transform_sharding", "logical_axes", "make_mesh", "mesh_shape", "process_rows",
           "put_batch", "put_replicated", "put_state", "spec_for", "state_shardings", "to_host"]

MESH_AXES = ("data", "fsdp", "tensor")  # BATCH_AXES (data, fsdp) come from sparsejax.nn

# Logical axis -> mesh axis (or None: replicated along it).
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "embed": "fsdp",  # the model width: FSDP shards parameters along it
    "heads": "tensor",  # attention projections: column-parallel qkv, row-parallel proj
    "mlp": "tensor",  # MLP hidden: column-parallel fc, row-parallel proj
    "vocab": "tensor",  # embedding table / output head rows
}

Axes = tuple[str | None, ...]


def logical_axes(model: nnx.Module) -> dict[str, Axes]:
    """``{path: logical axes}`` of every variable of ``model`` created with
    ``logical_axes`` metadata (``/``-joined paths as in :func:`spec_for`)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("logical_axes")
            if axes is not None:
                out["/".join(str(p) for p in path)] = tuple(axes)
    return out


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with a -1 resolved to the devices left over. Raises
    :class:`ConfigError` when the sizes do not fit ``num_devices``."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if num_devices % fixed:
            raise ConfigError(f"bad value for 'mesh.{free[0]}': the other axes use {fixed} "
                              f"devices, which does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ConfigError(f"bad value for 'mesh': data*fsdp*tensor = {total} but only "
                          f"{num_devices} device(s) are visible; set mesh.data=-1 to use "
                          "what there is")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all
    processes). Explicit sizes may use fewer devices than there are (the first ones)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), MESH_AXES)


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, axes: dict[str, Axes]
             ) -> PartitionSpec:
    """The ``PartitionSpec`` of the state array at ``path`` (``/``-joined) with ``shape``:
    the logical axes of the longest tail of ``path`` that names a variable in ``axes``
    (:func:`logical_axes`; optimiser moments end in their parameter's path) and whose rank
    fits, through :data:`LOGICAL_AXIS_RULES`; mesh axes of size 1 are dropped. Raises
    :class:`ConfigError` when a sharded dimension does not divide."""
    parts = path.split("/")
    for start in range(len(parts)):
        logical = axes.get("/".join(parts[start:]))
        if logical is None or len(logical) != len(shape):
            continue
        out = []
        for dim, name in enumerate(logical):
            mesh_axis = LOGICAL_AXIS_RULES.get(name) if name else None
            size = mesh.shape[mesh_axis] if mesh_axis else 1
            if size > 1 and shape[dim] % size:
                raise ConfigError(
                    f"bad value for 'mesh.{mesh_axis}': {path} has {shape[dim]} along "
                    f"axis {dim} ({name}), not divisible by mesh.{mesh_axis}={size}")
            out.append(mesh_axis if size > 1 else None)
        return PartitionSpec(*out)
    return PartitionSpec()


def state_shardings(tree: Any, mesh: Mesh, axes: dict[str, Axes]) -> Any:
    """A pytree of ``NamedSharding`` for every array of ``tree`` (params, rest, optimiser
    state), from the model's :func:`logical_axes`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), np.shape(x), mesh,
                                                     axes)),
        tree)


def check_transform_sharding(model: nnx.Module, mesh: Mesh) -> None:
    """Refuse a mesh that would split a run of rows a transform needs whole: every
    transform of a ``Linear`` states its blocking along the kernel's axis 0
    (``Transform.blocking``: N:M groups of ``m``, quantisation blocks of ``block_size``),
    so the rows each device holds must be a multiple of it. Raises :class:`ConfigError`
    naming the layer, the mesh axis and the sizes."""
    axes = logical_axes(model)
    for path, layer in named_layers(model, (Linear,)):
        if layer.kernel is None:
            continue
        spec = spec_for(f"{path}/kernel", layer.kernel.shape, mesh, axes)
        axis = spec[0] if len(spec) else None
        if axis is None:
            continue
        shards = mesh.shape[axis]
        rows = layer.in_features // shards
        for what, size in [b for _, slot in layer.slots()
                           for b in slot.spec.blocking(slot.site)]:
            if rows % size:
                raise ConfigError(
                    f"bad value for 'mesh.{axis}': layer {path} would split its {what} across "
                    f"devices: axis 0 (in={layer.in_features}) is sharded {shards} ways over "
                    f"mesh axis '{axis}' ({rows} rows each); use a mesh.{axis} that leaves a "
                    f"multiple of {size} rows per device")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: axis 0 split over ``data`` and ``fsdp``."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process feeds (its devices' shards, which
    are contiguous when the mesh lists each process's devices together)."""
    sharding = batch_sharding(mesh)
    indices = sharding.addressable_devices_indices_map((batch_size,))
    starts = sorted({(idx[0].start or 0) for idx in indices.values()})
    stops = sorted({(idx[0].stop or batch_size) for idx in indices.values()})
    return slice(starts[0], stops[-1])


def put_batch(local: dict[str, np.ndarray], mesh: Mesh, batch_size: int) -> dict[str, jax.Array]:
    """A global batch array from this process's rows (``local``, see :func:`process_rows`)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in local.items()}


def put_state(tree: Any, shardings: Any) -> Any:
    """Place every array of ``tree`` (identical on every process, e.g. built from the same
    seed) with its sharding from ``shardings`` (same structure)."""
    return jax.tree.map(_place, tree, shardings)


def _place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` (identical on every process) replicated over ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated (or fully addressable) arrays, on any process."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
