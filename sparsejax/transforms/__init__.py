"""Transforms: one registered spec class per sparsity, quantisation or analog method.

``sparsejax.transforms.base`` defines the protocol and the registry; the methods live one
per file under ``sparsity/``, ``prune/``, ``quant/``, ``analog/`` and ``attention/`` and
register themselves by name when this package is imported. Adding a method:
``docs/adding-a-method.md``.
"""

from sparsejax.transforms import analog, attention, prune, quant, sparsity
from sparsejax.transforms.base import (
    AttentionCalibration,
    AttentionData,
    AttentionMethod,
    CachedAttention,
    Calibration,
    Context,
    CustomMatmul,
    GradientHook,
    GramCalibration,
    Metrics,
    NoiseCounter,
    Packable,
    ParamGroup,
    Site,
    SpecError,
    Transform,
    View,
    build_spec,
    check_pipeline,
    head_statistics,
    methods,
    register,
    rule_field,
    rule_specs,
    select_matmul,
    spec_class,
    spec_fields,
)
from sparsejax.transforms.kinds import (
    LAYER_TYPE_NAMES,
    RuleBlock,
    block_for_key,
    declare_block,
    default_method,
    layer_stages,
    log_keys,
    rule_blocks,
    weight_stages,
)

__all__ = ["LAYER_TYPE_NAMES", "AttentionCalibration", "AttentionData", "AttentionMethod",
           "CachedAttention", "Calibration", "Context", "CustomMatmul", "GradientHook",
           "GramCalibration", "Metrics", "NoiseCounter", "Packable", "ParamGroup", "RuleBlock",
           "Site", "SpecError", "Transform", "View", "analog", "attention", "block_for_key",
           "build_spec", "check_pipeline", "declare_block", "default_method",
           "head_statistics", "layer_stages", "log_keys", "methods", "prune", "quant",
           "register", "rule_blocks", "rule_field", "rule_specs", "select_matmul",
           "spec_class", "spec_fields", "sparsity", "weight_stages"]
