"""Collectives in the compiled training step per mesh, beside what the sharding needs.

Compiles the trainer's full step (forward, backward, AdamW) of the default GPT
(configs/gpt_tiny.yaml) on 8 host devices for several ``(data, fsdp, tensor)`` meshes and
reads the collectives from the compiled HLO: count and bytes (result shapes) of
all-reduce, all-gather, reduce-scatter, collective-permute and all-to-all. Beside them, a
first-order account of what the sharding plan needs:

* data / fsdp (batch split): one all-reduce (or reduce-scatter under FSDP) of every
  parameter's gradient shard;
* fsdp (parameters sharded): an all-gather of every FSDP-sharded parameter;
* tensor: an all-reduce of the (local batch, T, C) activations after each row-parallel
  projection (attn/proj, mlp/proj) in the forward and of the input gradient of each
  column-parallel one (attn/qkv, mlp/fc) in the backward: 4 per block, and 2 for the
  vocab-sharded embedding (lookup in the forward, the tied head's input gradient in the
  backward).

A collective the plan does not explain (or a missing one) shows as a gap between the two.
No step is run; nothing is timed.

    python experiments/bench_sharding.py                 # ~3 min on 2 CPU cores
    python experiments/bench_sharding.py --meshes 8,1,1 1,8,1 1,1,8
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sparsejax.config import load_config  # noqa: E402
from sparsejax.optim import build_optimizer  # noqa: E402
from sparsejax.runs import TrainState, init_model  # noqa: E402
from sparsejax.sharding import (  # noqa: E402
    logical_axes,
    make_mesh,
    process_rows,
    put_batch,
    put_state,
    spec_for,
    state_shardings,
)
from sparsejax.tasks import build_task  # noqa: E402
from sparsejax.train import make_train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4,
               "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+"
                 r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(", re.M)
_SHAPE = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def hlo_collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """``{op: (count, bytes)}`` over the HLO text; bytes from each op's result shapes
    (an async ``-start`` op's result holds its operands too: half is counted)."""
    out = {op: (0, 0) for op in COLLECTIVES}
    for match in _OP.finditer(hlo):
        size = sum(DTYPE_BYTES.get(s["dtype"], 4) * int(np.prod(
            [int(d) for d in s["dims"].split(",") if d] or [1]))
            for s in _SHAPE.finditer(match["type"]))
        if match["start"]:
            size //= 2
        count, total = out[match["op"]]
        out[match["op"]] = (count + 1, total + size)
    return out


def expected(cfg, params, mesh, axes) -> dict[str, tuple[int, int]]:
    """First-order ``{op: (count, bytes)}`` the sharding plan needs (module docstring)."""
    d, f, t = (mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    grad_count = grad_bytes = gather_count = gather_bytes = 0
    for path, x in leaves:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path).removesuffix("/value")
        spec = spec_for(name, x.shape, mesh, axes)
        shards = int(np.prod([mesh.shape[a] for a in spec if a]))
        if d * f > 1:  # the gradient is reduced over the batch-split axes
            grad_count += 1
            grad_bytes += x.size * 4 // shards
        if "fsdp" in tuple(spec):  # gathered for use: full along fsdp, still split by tensor
            gather_count += 1
            gather_bytes += x.size * 4 // (shards // f)
    act = cfg.data.batch_size // (d * f) * cfg.model.block_size * cfg.model.n_embd * 4
    # 4 per block, plus the vocab-sharded (tied) embedding: the lookup's partial rows in the
    # forward and the head's input gradient in the backward.
    tp_count = 4 * cfg.model.n_layer + 2 if t > 1 else 0
    return {"all-reduce": (grad_count * (f == 1) + tp_count,
                           grad_bytes * (f == 1) + tp_count * act),
            "all-gather": (gather_count, gather_bytes),
            "reduce-scatter": (grad_count * (f > 1), grad_bytes * (f > 1))}


def compile_step(config: str, mesh_sizes: tuple[int, int, int], overrides: list[str]):
    d, f, t = mesh_sizes
    cfg = load_config(config, [*overrides, f"mesh.data={d}", f"mesh.fsdp={f}",
                               f"mesh.tensor={t}"])
    task = build_task(cfg)
    model = init_model(cfg)
    mesh = make_mesh(cfg.mesh)
    tx, _, frozen = build_optimizer(cfg, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    host = TrainState(params, rest, tx.init(params),
                      jax.random.key_data(jax.random.key(0))).as_dict()
    axes = logical_axes(model)
    shardings = state_shardings(host, mesh, axes)
    state = put_state(host, shardings)
    step = jax.jit(make_train_step(graphdef, task, tx, use_dropout=False,
                                   frozen_labels=frozen),
                   out_shardings=(shardings["params"], shardings["rest"],
                                  shardings["opt_state"], None))
    batch = put_batch(task.train_batch(0, process_rows(cfg.data.batch_size, mesh)), mesh,
                      cfg.data.batch_size)
    with jax.set_mesh(mesh):  # as the trainer traces it (the models pin activations)
        compiled = step.lower(state["params"], state["rest"], state["opt_state"],
                              state["rng"], batch, np.int32(0)).compile()
    return cfg, params, mesh, axes, compiled.as_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "gpt_tiny.yaml"))
    parser.add_argument("--meshes", nargs="+",
                        default=["8,1,1", "1,8,1", "1,1,8", "2,4,1", "2,2,2", "4,1,2"])
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_sharding"))
    args = parser.parse_args()

    lines = ["# Collectives in the compiled training step, per mesh", "",
             f"Command: `python experiments/bench_sharding.py --meshes {' '.join(args.meshes)}`"
             "  ", f"Config `{Path(args.config).name}` "
             f"{' '.join(args.override)}; {jax.device_count()} host devices (XLA CPU, "
             f"jax {jax.__version__}). Measured = read from the compiled HLO (count, MB of "
             "result shapes); needed = the sharding plan's first-order account (see the "
             "script's docstring).", "",
             "| mesh (data,fsdp,tensor) | collective | measured count | measured MB | "
             "needed count | needed MB |", "|---|---|---|---|---|---|"]
    for item in args.meshes:
        sizes = tuple(int(x) for x in item.split(","))
        cfg, params, mesh, axes, hlo = compile_step(args.config, sizes, args.override)
        measured, need = hlo_collectives(hlo), expected(cfg, params, mesh, axes)
        for op in COLLECTIVES:
            count, size = measured[op]
            ncount, nsize = need.get(op, (0, 0))
            if count or ncount:
                lines.append(f"| {item} | {op} | {count} | {size / 1e6:.3f} | {ncount} | "
                             f"{nsize / 1e6:.3f} |")
        print(f"{item}: " + ", ".join(f"{op} {c}x {b / 1e6:.2f} MB"
                                      for op, (c, b) in measured.items() if c), flush=True)
    lines += ["", "Reading the table:", "",
              "* Bytes are the result shapes of the ops in the per-device program (an "
              "all-gather's result is the gathered array, a reduce-scatter's the shard).",
              "* XLA combines the per-parameter gradient all-reduces into a few tuple ops, so "
              "their count is lower than the number of parameters while the bytes agree.",
              "* XLA:CPU lowers a reduce-scatter to an all-reduce plus a slice: under FSDP the "
              "gradient reduction shows as all-reduce bytes of the full gradients, not as "
              "reduce-scatter bytes of the shards.",
              "* With `tensor` > 1 the fused qkv kernel's [q | k | v] column blocks do not "
              "line up with contiguous shards, so attention needs extra all-to-all / "
              "collective-permute traffic to regroup heads; a head-interleaved qkv layout "
              "would remove it (a change of the checkpoint format, not made)."]
    heads = load_config(args.config, args.override).model.n_head
    split_heads = [m for m in args.meshes if int(m.split(",")[2]) > heads]
    if split_heads:
        lines.append(f"* Meshes {', '.join(split_heads)} have more tensor shards than the "
                     f"model has heads ({heads}): a head is split along its dimension and the "
                     "attention scores need an all-reduce of their own.")
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
