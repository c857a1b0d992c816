"""Model families, each declared once by its own file: its ``model.kind`` name, the task it
serves, its config keys and how to build it from them. The config schema (``model.*``
keys), the validation of ``model.kind`` and the task a run gets are read from these
declarations, so a new family is its model file (plus, for Hugging Face checkpoints, its
mapping) and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["LANGUAGE_MODEL_FIELDS", "Family", "ModelField", "families", "family", "model_fields",
           "register_family"]


class ModelField(NamedTuple):
    """One ``model.<name>`` config key: its type (``int``, ``float``, ``bool``, ``str``,
    ``int | None``, ``list[int]``), default and one line of documentation. Families that
    share a key (``n_layer``) must declare it alike."""

    name: str
    type: Any
    default: Any
    doc: str = ""


class Family(NamedTuple):
    """``name``: the ``model.kind`` value; ``task``: ``language`` (token ids ``(B, T)`` ->
    next-token logits, :class:`~sparsejax.models.base.LanguageModel`) or
    ``classification`` (features -> class logits); ``build(model_config, dtype, rngs)``:
    the model; ``fields``: its config keys; ``check(model_config)``: ``[(key, message),
    ...]`` of the settings it refuses."""

    name: str
    task: str
    build: Callable[[Any, Any, Any], Any]
    fields: tuple[ModelField, ...]
    check: Callable[[Any], list[tuple[str, str]]] = lambda m: []
    doc: str = ""


# The keys every language-model family shares (declared once, used by each family's file).
LANGUAGE_MODEL_FIELDS = (
    ModelField("vocab_size", int | None, None,
               "null: from the data (256 for bytes; a prepared corpus's meta.json); larger "
               "pads the embedding (e.g. 50304 for GPT-2's 50257)"),
    ModelField("block_size", int, 128, "the longest context"),
    ModelField("n_layer", int, 4), ModelField("n_head", int, 4),
    ModelField("n_embd", int, 128), ModelField("dropout", float, 0.0),
    ModelField("tie_embeddings", bool, True))

_FAMILIES: dict[str, Family] = {}


def register_family(declared: Family) -> Family:
    """Make ``declared`` a ``model.kind`` (called once, by its model file)."""
    if declared.task not in ("language", "classification"):
        raise ValueError(f"family '{declared.name}': unknown task '{declared.task}'")
    known = {f.name: f for other in _FAMILIES.values() for f in other.fields}
    for f in declared.fields:
        if f.name in known and (known[f.name].type, known[f.name].default) != (f.type,
                                                                               f.default):
            raise ValueError(f"family '{declared.name}' declares model.{f.name} unlike "
                             f"another family ({f.type}={f.default!r} vs "
                             f"{known[f.name].type}={known[f.name].default!r})")
    _FAMILIES[declared.name] = declared
    return declared


def families() -> tuple[str, ...]:
    """The registered ``model.kind`` names, sorted (whatever the import order)."""
    return tuple(sorted(_FAMILIES))


def family(name: str) -> Family:
    return _FAMILIES[name]


def model_fields() -> list[ModelField]:
    """Every family's config keys, each once (families sorted by name, then each family's
    declaration order)."""
    out: dict[str, ModelField] = {}
    for name in families():
        for f in _FAMILIES[name].fields:
            out.setdefault(f.name, f)
    return list(out.values())
