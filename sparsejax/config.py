"""Typed experiment configuration: OmegaConf structured configs + YAML + dotted overrides.

A config is one :class:`Config` dataclass, built from

1. the schema defaults below,
2. a YAML file (``configs/*.yaml``), and
3. command-line overrides in dotted form (``train.steps=200 optimizer.lr=3e-4``),

merged in that order. Every failure to build it - a missing file, an unknown key, a value
of the wrong type, an inconsistent combination - raises :class:`ConfigError` whose message is
one line naming the offending key (with close matches for misspelt keys). The CLI turns it
into that line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from sparsejax.corpus import read_meta
from sparsejax.errors import CheckpointError, ConfigError
from sparsejax.models.family import ModelField, families, family, model_fields
from sparsejax.transforms import (
    RuleBlock,
    SpecError,
    methods,
    rule_blocks,
    rule_specs,
    spec_class,
    spec_fields,
)

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "LoggingConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RuleConfig",
    "TrainConfig",
    "all_keys",
    "apply_overrides",
    "config_diff",
    "load_config",
    "resolve_data_path",
    "to_yaml",
]


# The repository holding this package (a source checkout or an editable install): relative
# data paths such as ``data/tinyshakespeare.txt`` also resolve against it, so a config runs
# from any working directory.
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_data_path(path: str | Path) -> Path | None:
    """``path`` if it exists (relative to the working directory), else a relative ``path``
    under the repository root if it exists there, else None."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    if not candidate.is_absolute() and (REPO_ROOT / candidate).exists():
        return REPO_ROOT / candidate
    return None


class DataSource(str, enum.Enum):
    stdlib = "stdlib"  # byte corpus from the running Python's standard-library sources
    text = "text"  # any text file, read as bytes
    tokens = "tokens"  # nanoGPT-style uint16 token file (or a directory with train.bin/val.bin)
    digits = "digits"  # scikit-learn's bundled 8x8 digits (classification)


def _field_default(f: ModelField) -> Any:
    """A ``dataclasses.field`` for a family's key (lists get a default factory)."""
    if isinstance(f.default, list):
        return field(default_factory=lambda d=tuple(f.default): list(d))
    return field(default=f.default)


def _model_schema() -> type:
    """The ``ModelConfig`` dataclass: ``kind`` (a registered family, ``sparsejax.models``),
    every family's declared keys, and ``dtype``. A new family's keys arrive with its
    declaration, not with an edit here."""
    fields: list[tuple[str, Any, Any]] = [("kind", str, field(default="gpt"))]
    fields += [(f.name, f.type, _field_default(f)) for f in model_fields()]
    # Parameters are float32; this is the compute dtype of matmuls (float32 | bfloat16).
    fields.append(("dtype", str, field(default="float32")))
    schema = dataclasses.make_dataclass("ModelConfig", fields)
    schema.__module__ = __name__
    schema.__doc__ = ("The model: ``kind`` (" + "|".join(families()) + "), the families' "
                      "keys - " + "; ".join(f"``{f.name}`` {f.doc}".rstrip()
                                            for f in model_fields()) + " - and ``dtype``.")
    return schema


ModelConfig = _model_schema()


@dataclass
class DataConfig:
    source: DataSource = DataSource.stdlib
    path: str | None = None  # file for `text` / `tokens`
    val_fraction: float = 0.1  # tail of the corpus held out for validation
    max_bytes: int = 0  # cap on the corpus size for byte sources (0 = no cap)
    batch_size: int = 32


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # clamped to train.steps - 1 when longer (a short smoke run)
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclass
class TrainConfig:
    steps: int = 600
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    # Split each batch into this many micro-batches whose gradients are summed inside the
    # jitted step: the same update as the full batch with 1/k of the activation memory.
    grad_accum: int = 1
    # Start from the parameters of another run (its run dir: latest checkpoint, or
    # <run>/checkpoints/<step>) before the rules apply, e.g. to sparsify a dense model.
    init_from: str | None = None


@dataclass
class LoggingConfig:
    log_every: int = 20
    tensorboard: bool = True
    progress: str = "auto"  # auto | bar | lines | none


@dataclass
class CheckpointConfig:
    every: int = 200
    keep: int = 3
    async_save: bool = True


# A transform block of a rule is a mapping ``{method: <name>, <field>: value, ...}`` whose
# schema is the method's spec class (``sparsejax.transforms``, one file per method):
# validation builds the spec, which names a bad or unknown field, and writes the block back
# with every field of the method filled in (so ``config.yaml`` records the defaults too).
TransformBlock = dict[str, Any]


def _rule_schema() -> type:
    """The ``RuleConfig`` dataclass, from the declared rule blocks
    (``sparsejax.transforms.kinds``): ``path`` plus one optional block per key; a dotted
    key (``quant.weights``) becomes a field of a nested dataclass (``quant``)."""
    groups: dict[str, list[RuleBlock]] = {}
    for block in rule_blocks():
        groups.setdefault(block.key.split(".")[0], []).append(block)
    fields: list[tuple[str, Any, Any]] = [("path", str, field(default=".*"))]
    lines = []
    for top, blocks in groups.items():
        for block in blocks:
            lines.append(f"``{block.key}`` (default method ``{block.default_method}``): "
                         f"{block.doc}")
        if any("." in b.key for b in blocks):
            inner = dataclasses.make_dataclass(
                f"{top.capitalize()}RuleConfig",
                [(b.key.split(".", 1)[1], Optional[TransformBlock], field(default=None))  # noqa: UP045
                 for b in blocks])
            inner.__module__ = __name__
            fields.append((top, Optional[inner], field(default=None)))  # noqa: UP045
        else:
            fields.append((top, Optional[TransformBlock], field(default=None)))  # noqa: UP045
    schema = dataclasses.make_dataclass("RuleConfig", fields)
    schema.__module__ = __name__
    schema.__doc__ = (
        "One path rule: ``path`` is a regex matched (``re.fullmatch``) against the "
        "``/``-joined module path of each layer (``blocks/0/mlp/fc``; list them with "
        "``sparsejax layers CONFIG``). The first matching rule wins. Blocks, each a "
        "method's fields (``docs/methods.md``), run in this order on a layer: "
        + "; ".join(lines) + ".")
    return schema


# Generated: a new kind of block (its declaration) adds its key here without an edit.
RuleConfig = _rule_schema()


@dataclass
class MeshConfig:
    """Device mesh (``jax.sharding``, GSPMD): sizes of the named axes; -1 = all devices
    left over (at most one axis). ``data``: batch split, parameters replicated; ``fsdp``:
    batch split and parameters / optimiser state sharded; ``tensor``: the attention and MLP
    projections split Megatron-style. The product must equal the number of devices (all
    processes together); the batch must divide by ``data * fsdp``."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class Config:
    name: str = "run"
    run_dir: str | None = None  # default: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rules: list[RuleConfig] = field(default_factory=list)


# --------------------------------------------------------------------------- key listing


def all_keys(schema: Any = Config, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema (``optimizer.lr``, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        keys.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.extend(all_keys(type(default), key + "."))
    return keys


def _close_matches(key: str) -> str:
    candidates = (all_keys() + [f"rules.N.{k}" for k in all_keys(RuleConfig)]
                  + [f"rules.N.{block.key}.{name}" for block in rule_blocks()
                     for method in methods(block.kind)
                     for name in spec_fields(spec_class(block.kind, method)())])
    candidates = list(dict.fromkeys(candidates))
    key = re.sub(r"rules(\.|\[)(\d+)\]?", "rules.N", key)
    matches = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not matches:  # try the last component alone (``lrr`` -> ``optimizer.lr``)
        leaf = key.rsplit(".", 1)[-1]
        matches = [c for c in candidates if difflib.get_close_matches(
            leaf, [c.rsplit(".", 1)[-1]], n=1, cutoff=0.75)][:3]
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def _describe(err: oc_errors.OmegaConfBaseException, origin: str) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, oc_errors.ConfigKeyError | oc_errors.ConfigAttributeError):
        return f"unknown key '{key}' in {origin}{_close_matches(key)}"
    if isinstance(err, oc_errors.ValidationError):
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        return f"bad value for '{key}' in {origin}: {msg}"
    if isinstance(err, oc_errors.MissingMandatoryValue):
        return f"missing value for '{key}' in {origin}"
    return f"{origin}: {str(err).splitlines()[0]}"


# --------------------------------------------------------------------------- loading

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def apply_overrides(cfg: DictConfig, overrides: list[str], origin: str = "overrides") -> DictConfig:
    """Merge dotted ``key=value`` overrides into a structured config (type-checked)."""
    known = set(all_keys())
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise ConfigError(f"bad override '{item}': expected key=value, e.g. train.steps=200")
        key = item.split("=", 1)[0]
        if key not in known and not key.startswith("rules."):
            raise ConfigError(f"unknown key '{key}' in {origin}{_close_matches(key)}")
    cfg = cfg.copy()
    for item in overrides:  # in order: `rules=[...]` then `rules.0.x=...` works
        key, value = item.split("=", 1)
        index = re.match(r"rules\.(\d+)\.", key)
        if index and int(index.group(1)) >= len(cfg.rules):
            raise ConfigError(f"bad key '{key}' in {origin}: the config has {len(cfg.rules)} "
                              "rule(s); add rules with rules=[{path: ..., sparsity: {...}}]")
        try:
            parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]  # YAML-typed value
            # update() (unlike a merge) reaches into lists: rules.0.sparsity.method=ste
            OmegaConf.update(cfg, key, parsed, merge=True)
        except (oc_errors.OmegaConfBaseException, IndexError) as err:
            if isinstance(err, IndexError):
                raise ConfigError(f"bad key '{key}' in {origin}: {err}") from None
            raise ConfigError(_describe(err, origin)) from None
    return cfg


def _check_sections(loaded: DictConfig, origin: str) -> None:
    """A section of the schema (``model``, ``data``, ...) given as something other than a
    mapping is named here: OmegaConf's own merge error carries no key."""
    sections = {f.name for f in dataclasses.fields(Config) if str(f.type).endswith("Config")}
    for key in sections & set(loaded.keys()):
        value = loaded._get_node(key)._value()
        if value is not None and not isinstance(value, DictConfig | dict):
            raise ConfigError(f"bad value for '{key}' in {origin}: expected a mapping of "
                              f"{key}.* keys, got {type(value).__name__} {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from an optional YAML file plus overrides.

    The config's ``name`` defaults to the YAML file's stem when the file does not set one.
    """
    schema = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping of keys, got a list")
        if "name" not in loaded:
            loaded.name = path.stem
        _check_sections(loaded, str(path))
        try:
            schema = OmegaConf.merge(schema, loaded)
        except oc_errors.OmegaConfBaseException as err:
            raise ConfigError(_describe(err, str(path))) from None
    schema = apply_overrides(schema, list(overrides or []))
    cfg: Config = OmegaConf.to_object(schema)
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """A :class:`Config` from a plain nested dict (e.g. a saved ``config.yaml``)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except oc_errors.OmegaConfBaseException as err:
        raise ConfigError(_describe(err, "config dict")) from None
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """``{"optimizer.lr": 0.003, "rules.0.sparsity.method": "sste", ...}``: one dotted key
    per setting, lists of mappings (the rules) indexed by position, enums as their values,
    lists of plain values (``model.hidden``) as lists."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, ListConfig) and any(
                isinstance(v, (DictConfig, ListConfig)) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            value = OmegaConf.to_container(node) if isinstance(node, ListConfig) else node
            if isinstance(value, enum.Enum):
                value = value.value
            flat[prefix[:-1]] = value

    walk(OmegaConf.structured(cfg), "")
    return flat


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = to_flat_dict(a), to_flat_dict(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


# --------------------------------------------------------------------------- validation


def _float_fields(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """``(dotted key, value)`` of every float in a config (rules included)."""
    if dataclasses.is_dataclass(node):
        return [pair for f in dataclasses.fields(node)
                for pair in _float_fields(getattr(node, f.name), f"{prefix}{f.name}.")]
    if isinstance(node, list | tuple):
        return [pair for i, item in enumerate(node)
                for pair in _float_fields(item, f"{prefix}{i}.")]
    return [(prefix[:-1], node)] if isinstance(node, float) else []


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"bad value for '{key}': {msg}")


def validate(cfg: Config) -> None:
    """Cross-field checks OmegaConf's types cannot express. Raises :class:`ConfigError`."""
    for check in (_validate_name_and_floats, _validate_ranges, _validate_mesh, _validate_data,
                  _validate_rules):
        check(cfg)


def _validate_name_and_floats(cfg: Config) -> None:
    """The run name stays inside runs/; every float is finite."""
    _require(bool(re.fullmatch(r"[\w.\-=,/+]+", cfg.name)), "name",
             f"'{cfg.name}' must be letters, digits and . _ - = , / + only")
    # the run directory is runs/<name> unless run_dir is set: a name may nest (sweeps use
    # <name>/<variant>) but never climb out of runs/
    _require(all(part not in ("", ".", "..") for part in cfg.name.split("/")), "name",
             f"'{cfg.name}' must stay inside runs/: no empty, '.' or '..' path components")
    for key, value in _float_fields(cfg):
        _require(math.isfinite(value), key, f"must be a finite number, got {value}")


def _validate_ranges(cfg: Config) -> None:
    """Sizes, counts and rates within their ranges."""
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
    for key, value in [("model.block_size", m.block_size), ("model.n_layer", m.n_layer),
                       ("model.n_head", m.n_head), ("model.n_embd", m.n_embd),
                       ("model.mlp_ratio", m.mlp_ratio),
                       ("model.num_classes", m.num_classes), ("data.batch_size", d.batch_size),
                       ("train.steps", t.steps), ("train.eval_every", t.eval_every),
                       ("train.eval_batches", t.eval_batches),
                       ("train.grad_accum", t.grad_accum),
                       ("logging.log_every", cfg.logging.log_every),
                       ("checkpoint.every", cfg.checkpoint.every),
                       ("checkpoint.keep", cfg.checkpoint.keep)]:
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(m.kind in families(), "model.kind",
             f"'{m.kind}' is not one of {'|'.join(families())}")
    for key, message in family(m.kind).check(m):
        _require(False, key, message)
    _require(all(h > 0 for h in m.hidden), "model.hidden", f"sizes must be > 0, got {m.hidden}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.dtype in ("float32", "bfloat16"), "model.dtype",
             f"'{m.dtype}' is not one of float32|bfloat16")
    _require(0.0 < d.val_fraction < 1.0, "data.val_fraction",
             f"must be in (0, 1), got {d.val_fraction}")
    _require(d.max_bytes >= 0, "data.max_bytes", f"must be >= 0, got {d.max_bytes}")
    _require(o.name in ("adamw",), "optimizer.name", f"'{o.name}' is not one of adamw")
    _require(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio",
             f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps",
             f"must be >= 0, got {o.warmup_steps}")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0, got {o.grad_clip}")
    _require(cfg.logging.progress in ("auto", "bar", "lines", "none"), "logging.progress",
             f"'{cfg.logging.progress}' is not one of auto|bar|lines|none")


def _validate_mesh(cfg: Config) -> None:
    """Mesh axis sizes, and a batch that splits over them and the micro-batches."""
    d, t = cfg.data, cfg.train
    sizes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp,
             "mesh.tensor": cfg.mesh.tensor}
    for key, value in sizes.items():
        _require(value == -1 or value >= 1, key, f"must be >= 1 or -1 (the rest), got {value}")
    _require(sum(v == -1 for v in sizes.values()) <= 1, "mesh",
             f"at most one axis may be -1, got {sizes}")
    fixed = [v for k, v in sizes.items() if k != "mesh.tensor"]
    _require(d.batch_size % t.grad_accum == 0, "train.grad_accum",
             f"data.batch_size={d.batch_size} is not divisible by {t.grad_accum} micro-batches")
    if -1 not in fixed:
        split = cfg.mesh.data * cfg.mesh.fsdp
        _require(d.batch_size % split == 0, "data.batch_size",
                 f"{d.batch_size} is not divisible by mesh.data * mesh.fsdp = {split}")
        _require(d.batch_size % (split * t.grad_accum) == 0, "train.grad_accum",
                 f"data.batch_size={d.batch_size} does not split into {t.grad_accum} "
                 f"micro-batches of whole rows per device (mesh.data * mesh.fsdp = {split})")


def _validate_data(cfg: Config) -> None:
    """A data source the model kind can read, its path, the vocabulary."""
    m, d = cfg.model, cfg.data
    byte_sources = (DataSource.stdlib, DataSource.text, DataSource.tokens)
    language = family(m.kind).task == "language"
    if language:
        _require(d.source in byte_sources, "data.source",
                 f"model.kind={m.kind} needs a token source (stdlib|text|tokens), got "
                 f"{d.source.value}")
    else:
        _require(d.source == DataSource.digits, "data.source",
                 f"model.kind={m.kind} needs data.source=digits, got {d.source.value}")
    if d.source in (DataSource.text, DataSource.tokens):
        _require(d.path is not None, "data.path", f"data.source={d.source.value} needs a path")
        found = resolve_data_path(d.path)
        _require(found is not None, "data.path", f"file not found: {d.path}")
        d.path = str(found)
    if language:
        _resolve_vocab(cfg)


def _validate_rules(cfg: Config) -> None:
    """Each rule's regex and blocks; fields the whole optimiser shares agree."""
    t = cfg.train
    shared: dict[tuple[type, str], tuple[int, Any]] = {}
    for i, rule in enumerate(cfg.rules):
        try:
            re.compile(rule.path)
        except re.error as err:
            raise ConfigError(f"bad value for 'rules.{i}.path': invalid regex "
                              f"'{rule.path}' ({err})") from None
        specs = _validate_rule(rule, f"rules.{i}", t.steps)
        for _, (key, spec) in specs.items():
            for name in spec.optimizer_fields:  # the same method elsewhere must agree
                first = shared.setdefault((type(spec), name), (i, getattr(spec, name)))
                _require(first[1] == getattr(spec, name), f"rules.{i}.{key}.{name}",
                         f"{getattr(spec, name)} differs from rules.{first[0]}: it applies "
                         "to the whole optimiser")


def _resolve_vocab(cfg: Config) -> None:
    """Set ``model.vocab_size`` from the data when it is null; refuse one smaller than the
    data's vocabulary (256 for byte sources, ``meta.json``'s for a prepared corpus)."""
    m, d = cfg.model, cfg.data
    where, data_vocab = "byte-level data", 256
    if d.source == DataSource.tokens:
        meta = read_meta(d.path) if Path(d.path).is_dir() else None
        where = f"{Path(d.path) / 'meta.json'}"
        data_vocab = None if meta is None else int(meta["vocab_size"])
    if m.vocab_size is None:
        _require(data_vocab is not None, "model.vocab_size",
                 f"must be set for {d.path}: a token file without meta.json does not say "
                 "its vocabulary (or prepare it with `sparsejax prepare`)")
        m.vocab_size = data_vocab
    _require(m.vocab_size > 0, "model.vocab_size", f"must be > 0, got {m.vocab_size}")
    if data_vocab is not None:
        _require(m.vocab_size >= data_vocab, "model.vocab_size",
                 f"{m.vocab_size} is smaller than the vocabulary of {where} ({data_vocab})")


def _validate_rule(rule: RuleConfig, prefix: str, steps: int) -> dict[str, Any]:
    """Build a rule's specs (their checks name the field), check they can run for
    ``steps``, and write each block back with all of its method's fields."""
    try:
        specs = rule_specs(rule)
        for key, spec in specs.values():
            try:
                spec.bind(steps)
            except SpecError as err:
                raise SpecError(f"{key}.{err.field}", str(err)) from None
    except SpecError as err:
        key = f"{prefix}.{err.field}"
        if err.unknown:
            raise ConfigError(f"unknown key '{key}'{_close_matches(key)}") from None
        raise ConfigError(f"bad value for '{key}': {err}") from None
    for key, spec in specs.values():
        if "." in key:
            setattr(getattr(rule, key.split(".")[0]), key.split(".")[1], spec_fields(spec))
        else:
            setattr(rule, key, spec_fields(spec))
    return specs
