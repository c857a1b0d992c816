"""``sparsejax`` command line.

    sparsejax train CONFIG [key=value ...] [--sweep key=v1,v2 ...]
        [--coordinator HOST:PORT --num-processes N --process-id I]
    sparsejax layers CONFIG [key=value ...]
    sparsejax prepare CORPUS [CORPUS ...] --out DIR [--tokenizer bytes|bpe|PATH.json]
    sparsejax sample RUN_DIR [--prompt TEXT] [--max-new-tokens 200] [--temperature 0.8]
    sparsejax compare CHECKPOINT [CHECKPOINT ...] [--steps N,N] [--logdir runs/compare]
    sparsejax evaluate-analog RUN_DIR [--times 60,3600,...] [--repeats 5]
    sparsejax prune RUN_DIR --method magnitude|wanda|sparsegpt|dsf --sparsity S | --nm N:M
        --out NEW_RUN_DIR [--layers REGEX] [--calib-batches 32]
    sparsejax compress RUN_DIR --method signed_cuts|rtn|rtn_minmax|svd --bits B --out NEW_RUN_DIR
        [--layers REGEX]

Configuration problems print one line to stderr and exit with code 2 before anything is
written; a diverged run exits with code 3.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsejax.config import Config, ConfigError, load_config

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def _parse_sweeps(sweeps: Sequence[str]) -> list[list[str]]:
    """``["a.b=1,2", "c=x,y"]`` -> the cartesian product as override lists."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"bad --sweep '{item}': expected key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _variant_name(overrides: Sequence[str]) -> str:
    return ",".join(f"{o.split('=', 1)[0].rsplit('.', 1)[-1]}={o.split('=', 1)[1]}"
                    for o in overrides)


def build_configs(config: str, overrides: Sequence[str], sweeps: Sequence[str]
                  ) -> list[Config]:
    """Every config a ``train`` call will run; a sweep's variants become
    ``<name>/<key=value,...>`` under one parent directory."""
    variants = _parse_sweeps(sweeps)
    if variants == [[]]:
        return [load_config(config, list(overrides))]
    base = load_config(config, list(overrides))
    parent = base.run_dir or os.path.join("runs", base.name)
    configs = []
    for extra in variants:
        variant = _variant_name(extra)
        configs.append(load_config(config, [*overrides, *extra, f"name={base.name}/{variant}",
                                            f"run_dir={os.path.join(parent, variant)}"]))
    return configs


def _cmd_train(args: argparse.Namespace) -> int:
    configs = build_configs(args.config, args.overrides, args.sweep)  # all checked up front
    from sparsejax.distributed import initialize

    try:
        initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    from sparsejax.errors import NonFiniteLossError
    from sparsejax.train import run

    summaries = []
    for cfg in configs:
        try:
            results = run(cfg)
        except NonFiniteLossError as err:
            print(f"sparsejax: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        summaries.append((cfg.name, results))
    if len(summaries) > 1:
        keys = [k for k in summaries[0][1] if k.startswith("val_")]
        print("\nsweep summary")
        print("\t".join(["run", *keys]))
        for name, res in summaries:
            print("\t".join([name, *(f"{res[k]:.4f}" for k in keys)]))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from sparsejax.corpus import prepare

    meta = prepare(args.corpora, args.out, tokenizer=args.tokenizer,
                   vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   overwrite=args.overwrite)
    splits = meta["splits"]
    print(f"wrote {args.out}/train.bin, val.bin, meta.json"
          f"{', tokenizer.json' if meta['tokenizer'] != 'bytes' else ''}: "
          f"vocabulary {meta['vocab_size']} ({meta['dtype']})")
    for split, c in splits.items():
        print(f"  {split:5s} {c['tokens']:>12,d} tokens  {c['bytes']:>12,d} bytes  "
              f"{c['bytes'] / max(c['tokens'], 1):.2f} bytes/token")
    print(f"train with: data.source=tokens data.path={args.out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from sparsejax.sample import sample

    result = sample(args.run_dir, args.prompt, args.max_new_tokens, args.temperature,
                    args.top_k, args.seed, args.step, args.pack)
    print(result.prompt + result.text)
    print(f"\n[{result.new_tokens} tokens in {result.seconds:.2f} s: "
          f"{result.tokens_per_sec:.1f} tokens/s with a KV cache]", file=sys.stderr)
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from sparsejax.nn import Activation, Attention, named_layers
    from sparsejax.runs import init_model

    cfg = load_config(args.config, args.overrides)
    model = init_model(cfg)
    for path, layer in named_layers(model):
        what = " ".join(f"{stage}:{slot.spec.summary()}" for stage, slot in layer.slots())
        print(f"{path}\t{tuple(layer.kernel.shape)}\t{what or 'dense'}")
    for path, act in named_layers(model, (Activation,)):
        what = " ".join(f"{stage}:{slot.spec.summary()}" for stage, slot in act.slots())
        print(f"{path}\t{act.fn}\t{what or '-'}")
    for path, attn in named_layers(model, (Attention,)):
        what = " ".join(f"{stage}:{slot.spec.summary()}" for stage, slot in attn.slots())
        print(f"{path}\tattention {attn.n_head}x{attn.head_dim}\t{what or 'softmax'}")
    return 0


def _short_name(path: Path) -> str:
    path = path.resolve()
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}@{path.name}"
    return path.name


def _cmd_compare(args: argparse.Namespace) -> int:
    from sparsejax.compare import compare_checkpoints, format_rows

    logdir = Path(args.logdir)
    name = args.name or "_vs_".join(_short_name(Path(p)) for p in args.checkpoints)
    print(f"writing TensorBoard runs to {logdir / name} (--logdir, --name)", flush=True)
    result = compare_checkpoints(args.checkpoints, logdir=logdir, name=name,
                                 steps=args.steps, progress=print)
    for pair in result.pairs:
        changed = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(pair.diff.items())[:6])
        print(f"\n{pair.name}: {changed or 'same config'}"
              f"{' ...' if len(pair.diff) > 6 else ''}")
        print(format_rows(result.means(pair) + result.table(pair)
                          + [r for r in result.rows if r["pair"] == pair.name and "note" in r]))
    print(f"\nTensorBoard: tensorboard --logdir {logdir / name}")
    return 0


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of steps: {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError("no steps given")
    return steps


def _cmd_evaluate_analog(args: argparse.Namespace) -> int:
    from sparsejax.analog_eval import (
        default_out_dir,
        evaluate_analog,
        format_table,
        parse_times,
        set_eval_activation_noise,
        write_report,
    )
    from sparsejax.runs import load_model, resolve_checkpoint

    times = parse_times(args.times)
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.act_noise < 0:
        raise ConfigError(f"--act-noise must be >= 0, got {args.act_noise}")
    run_dir, step = resolve_checkpoint(args.run_dir, args.step)
    out_dir = Path(args.out) if args.out else default_out_dir(run_dir)
    if out_dir.exists():
        raise ConfigError(f"--out {out_dir} exists; choose a new directory")
    model, cfg, step = load_model(run_dir, step)
    if args.act_noise:
        set_eval_activation_noise(model, args.act_noise, args.act_noise_correlated,
                                  seed=args.seed)
    rows = evaluate_analog(model, cfg, times, repeats=args.repeats, seed=args.seed,
                           compensate=not args.no_drift_compensation, layers=args.layers,
                           progress=None if args.quiet else print)
    header = (f"# Analog (PCM) evaluation of {run_dir} at step {step}\n\n"
              f"`sparsejax {' '.join(sys.argv[1:]) if sys.argv[1:] else 'evaluate-analog'}`"
              f"\n\nPCM model: aihwkit PCMLikeNoiseModel defaults (simulation); {args.repeats} "
              f"programmed chips per time; drift compensation "
              f"{'off' if args.no_drift_compensation else 'on'}; activation noise in eval "
              f"{args.act_noise:g}{' (correlated)' if args.act_noise_correlated else ''}.")
    write_report(rows, out_dir, header)
    print(format_table(rows))
    print(f"\nwritten: {out_dir}/analog_eval.md, .csv; TensorBoard: tensorboard --logdir "
          f"{out_dir}")
    return 0


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    import yaml

    return key, yaml.safe_load(value)


def _cmd_prune(args: argparse.Namespace) -> int:
    from sparsejax.posttrain import parse_nm, prune_run

    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    report = prune_run(args.run_dir, args.out, method=args.method, sparsity=args.sparsity,
                       nm=None if args.nm is None else parse_nm(args.nm), layers=args.layers,
                       calib_batches=args.calib_batches, calib_seed=args.calib_seed,
                       calib_data=args.calib_data, calib_seq_len=args.calib_seq_len,
                       sequential=not args.parallel, step=args.step,
                       options=dict(args.option), progress=None if args.quiet else print)
    before, after = report["before"], report["after"]
    print(f"validation loss {before['loss']:.4f} -> {after['loss']:.4f} after pruning "
          f"{len(report['per_layer'])} layers to density {report['density']:.3f} "
          f"({report['prune_seconds']:.1f} s); written {args.out}")
    print(f"fine-tune with the masks kept: sparsejax train {args.out}/config.yaml "
          f"train.init_from={args.out} run_dir=<NEW> train.steps=<N>")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from sparsejax.compress import compress_run

    report = compress_run(args.run_dir, args.out, method=args.method, bits=args.bits,
                          layers=args.layers, step=args.step,
                          progress=None if args.quiet else print)
    if args.quiet:
        print(f"validation loss {report['before']['loss']:.4f} -> "
              f"{report['after']['loss']:.4f} at {report['bits_per_weight']:.3f} bits per "
              f"weight; written {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sparsejax.export import export_run

    done = export_run(args.source, args.out, step=args.step)
    print(f"exported step {done['step']} of {args.source} as {done['model_type']} "
          f"({done['tensors']} tensors) to {done['out']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sparsejax.evaluate import evaluate_text_file

    result = evaluate_text_file(args.source, args.data, block_size=args.block_size,
                                stride=args.stride, batch_size=args.batch_size,
                                step=args.step, json_out=args.json)
    print(f"perplexity {result['perplexity']:.4f}, bits per byte "
          f"{result['bits_per_byte']:.4f} ({result['scored']:,} of {result['tokens']:,} "
          f"tokens scored; block {result['block_size']}, stride {result['stride']})")
    return 0


def _add_source(parser: argparse.ArgumentParser, name: str = "run_dir") -> None:
    """The model a command reads: a run, one of its checkpoints or a Hugging Face model
    directory, and ``--step``."""
    parser.add_argument(name, help="run directory (latest checkpoint), "
                        "<run>/checkpoints/<step> or a Hugging Face model directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step")


def _add_train(sub: Any) -> None:
    """The ``train`` command's arguments."""
    train = sub.add_parser("train", help="train from a YAML config (resumes if the run exists)")
    train.add_argument("config", help="YAML config file, e.g. configs/gpt_tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    train.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                       help="repeatable; runs the cartesian product, one run directory each")
    train.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="multi-host: address of process 0 (with --num-processes and "
                       "--process-id; under SLURM they come from the allocation)")
    train.add_argument("--num-processes", type=int, default=None)
    train.add_argument("--process-id", type=int, default=None)
    train.set_defaults(func=_cmd_train)


def _add_prepare(sub: Any) -> None:
    """The ``prepare`` command's arguments."""
    prep = sub.add_parser(
        "prepare", help="tokenize text files into train.bin / val.bin for data.source=tokens",
        description="Tokenize CORPUS files (streamed) with a byte-level BPE trained on them "
        "(or raw bytes, or a given tokenizer.json) into OUT/train.bin, val.bin, "
        "tokenizer.json and meta.json. The last --val-fraction of each file is validation.")
    prep.add_argument("corpora", nargs="+", metavar="CORPUS", help="text files")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", default="bpe", metavar="bytes|bpe|PATH.json",
                      help="raw bytes, a BPE trained here, or a tokenizers file "
                      "(default: %(default)s)")
    prep.add_argument("--vocab-size", type=int, default=8192,
                      help="BPE vocabulary, <|endoftext|> included (default: %(default)s)")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="tail of each corpus held out (default: %(default)s)")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an earlier preparation in --out")
    prep.set_defaults(func=_cmd_prepare)


def _add_sample(sub: Any) -> None:
    """The ``sample`` command's arguments."""
    smp = sub.add_parser("sample", help="continue a prompt with a trained run's model "
                         "(KV-cached decoding)")
    _add_source(smp, "run_dir")
    smp.add_argument("--prompt", default="", help="text to continue (default: start of text)")
    smp.add_argument("--max-new-tokens", type=int, default=200)
    smp.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    smp.add_argument("--top-k", type=int, default=40, help="0: no cut")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--pack", action="store_true",
                     help="run 2:4 sparse layers packed (their sparse kernel)")
    smp.set_defaults(func=_cmd_sample)


def _add_layers(sub: Any) -> None:
    """The ``layers`` command's arguments."""
    layers = sub.add_parser("layers", help="list the layers' paths (for rules)")
    layers.add_argument("config")
    layers.add_argument("overrides", nargs="*")
    layers.set_defaults(func=_cmd_layers)


def _add_compare(sub: Any) -> None:
    """The ``compare`` command's arguments."""
    compare = sub.add_parser(
        "compare", help="compare runs layer by layer over training (table + TensorBoard)",
        description="Compare every later run or checkpoint with the first (B vs A, C vs A, "
        "...): relative distance, cosine, mask overlap (with the random-mask baseline), "
        "sparsity and quantisation error per layer, at every checkpoint step the runs "
        "share. Prints a table and writes one TensorBoard run per pair under "
        "LOGDIR/NAME.")
    compare.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                         help="run directories (every shared checkpoint step) or "
                         "<run>/checkpoints/<step> (that checkpoint)")
    compare.add_argument("--steps", "--step", type=_steps, default=None, metavar="N[,N...]",
                         help="checkpoint steps to compare (default: every step the runs "
                         "share; their latest checkpoints when they share none)")
    compare.add_argument("--logdir", default="runs/compare",
                         help="TensorBoard root (default: %(default)s)")
    compare.add_argument("--name", default=None, help="directory under --logdir (default: "
                         "the run names joined by _vs_); an earlier comparison there is "
                         "replaced")
    compare.set_defaults(func=_cmd_compare)


def _add_evaluate_analog(sub: Any) -> None:
    """The ``evaluate-analog`` command's arguments."""
    analog = sub.add_parser("evaluate-analog", help="program a trained run onto simulated "
                            "PCM devices and evaluate it at times after programming")
    _add_source(analog, "run_dir")
    analog.add_argument("--times", default="60,3600,86400,2592000,31536000",
                        help="seconds after programming, comma-separated (suffixes m,h,d,y)")
    analog.add_argument("--repeats", type=int, default=5, help="programmed chips per time")
    analog.add_argument("--seed", type=int, default=0)
    analog.add_argument("--layers", default=None, help="regex of linear layers to program "
                        "(default: the analog layers, or all linear layers)")
    analog.add_argument("--no-drift-compensation", action="store_true")
    analog.add_argument("--act-noise", type=float, default=0.0,
                        help="activation noise std kept on during evaluation")
    analog.add_argument("--act-noise-correlated", action="store_true")
    analog.add_argument("--out", default=None,
                        help="report directory (default <run_dir>/analog_eval/<time>)")
    analog.add_argument("--quiet", action="store_true")
    analog.set_defaults(func=_cmd_evaluate_analog)


def _add_prune(sub: Any) -> None:
    """The ``prune`` command's arguments."""
    prune = sub.add_parser(
        "prune", help="one-shot post-training pruning of a trained run with calibration "
        "data (magnitude, Wanda, SparseGPT, DSF)",
        description="Prune the linear layers of a trained run, calibrated on batches of "
        "its training data, layer by layer in forward order (each layer sees the outputs "
        "of the already pruned ones), and write the pruned model as a new run directory "
        "(step 0) that compare, evaluate-analog, sample and train.init_from read. Prints "
        "the validation loss before and after.")
    _add_source(prune, "run_dir")
    prune.add_argument("--method", required=True, metavar="magnitude|wanda|sparsegpt|dsf")
    pattern = prune.add_mutually_exclusive_group(required=True)
    pattern.add_argument("--sparsity", type=float, default=None,
                         help="unstructured: fraction of each layer's weights removed")
    pattern.add_argument("--nm", default=None, metavar="N:M",
                         help="keep N of every M weights along the inputs, e.g. 2:4")
    prune.add_argument("--out", required=True, help="new run directory (must not exist)")
    prune.add_argument("--layers", default=".*", metavar="REGEX",
                       help="layer paths to prune (default: every linear layer; list them "
                       "with `sparsejax layers`)")
    prune.add_argument("--calib-batches", type=int, default=32,
                       help="training batches of calibration data (default: %(default)s)")
    prune.add_argument("--calib-seed", type=int, default=None,
                       help="seed of the calibration batches (default: the run's)")
    prune.add_argument("--calib-data", default=None, metavar="FILE",
                       help="calibrate on this text file instead of the training stream "
                       "(consecutive sequences, as Wanda / SparseGPT use C4)")
    prune.add_argument("--calib-seq-len", type=int, default=None,
                       help="tokens per --calib-data sequence (default: the context)")
    prune.add_argument("--parallel", action="store_true",
                       help="calibrate every layer on the dense model in one pass instead "
                       "of sequentially")
    prune.add_argument("--option", type=_option, action="append", default=[],
                       metavar="KEY=VALUE", help="a method field, e.g. rounds=20 (dsf) or "
                       "blocksize=64 (sparsegpt); repeatable")
    prune.add_argument("--quiet", action="store_true")
    prune.set_defaults(func=_cmd_prune)


def _add_compress(sub: Any) -> None:
    """The ``compress`` command's arguments."""
    compress = sub.add_parser(
        "compress", help="post-training compression of a trained run's linear layers to a "
        "bits-per-weight budget (1-bit signed cuts; absmax RTN and truncated SVD)",
        description="Compress the matched linear layers of a trained run (the weights only; "
        "simulated: the approximations are written as dense kernels) and write a new run "
        "directory (step 0) with compress.json. Prints the validation loss before and after.")
    _add_source(compress, "run_dir")
    compress.add_argument("--method", required=True, metavar="signed_cuts|rtn|rtn_minmax|svd")
    compress.add_argument("--bits", type=float, required=True,
                          help="bits per weight of each compressed layer, e.g. 1 or 0.5")
    compress.add_argument("--out", required=True, help="new run directory (must not exist)")
    compress.add_argument("--layers", default=r"blocks/\d+/(attn|mlp)/.*", metavar="REGEX",
                          help="layer paths (default: the transformer blocks' linears)")
    compress.add_argument("--quiet", action="store_true")
    compress.set_defaults(func=_cmd_compress)


def _add_export(sub: Any) -> None:
    """The ``export`` command's arguments."""
    export = sub.add_parser(
        "export", help="write a run as a Hugging Face model directory (transformers loads it)",
        description="Write the model of a run, checkpoint or Hugging Face directory as "
        "config.json + model.safetensors (+ tokenizer.json): the inference weights, sparse "
        "layers dense with their zeros, MaskLLM's masks applied, quantisation dequantised.")
    _add_source(export, "source")
    export.add_argument("--out", required=True, help="new directory (must not exist)")
    export.set_defaults(func=_cmd_export)


def _add_evaluate(sub: Any) -> None:
    """The ``evaluate`` command's arguments."""
    ev = sub.add_parser(
        "evaluate", help="perplexity and bits per byte of a model on a text file "
        "(the strided fixed-length protocol)",
        description="Encode FILE as one sequence with the model's tokenizer; windows of "
        "--block-size tokens every --stride tokens score only the targets no earlier "
        "window scored. Prints perplexity and bits per byte.")
    _add_source(ev, "source")
    ev.add_argument("--data", required=True, metavar="FILE", help="text file")
    ev.add_argument("--block-size", type=int, default=None, help="window length (default: "
                    "the model's context)")
    ev.add_argument("--stride", type=int, default=None, help="window start spacing "
                    "(default: the block size)")
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    ev.add_argument("--json", default=None, metavar="OUT", help="also write the result")
    ev.set_defaults(func=_cmd_evaluate)


# One small builder per command: a new command is its builder plus its _cmd_ function.
COMMANDS = (_add_train, _add_prepare, _add_sample, _add_layers, _add_compare,
            _add_evaluate_analog, _add_prune, _add_compress, _add_export, _add_evaluate)


def make_parser() -> argparse.ArgumentParser:
    """The ``sparsejax`` argument parser: one sub-command per :data:`COMMANDS` builder."""
    parser = argparse.ArgumentParser(prog="sparsejax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)


    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"sparsejax: {err.kind}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sparsejax: interrupted; the latest checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
