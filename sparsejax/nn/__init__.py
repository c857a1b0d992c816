"""Flax NNX layers that the models are built from, and the path rules that configure them.

Models are assembled only from these layers so that path rules can find every linear map
by its module path and give it a transform without touching model code.
"""

from sparsejax.nn.attention import Attention, tap_attention
from sparsejax.nn.layers import (
    ACTIVATIONS,
    BATCH_AXES,
    Activation,
    Embed,
    LayerNorm,
    Linear,
    PackedState,
    RMSNorm,
    WeightOverride,
    dropout,
    pack_model,
    shard_batch,
    tap_linear_inputs,
)
from sparsejax.nn.rules import (
    analog_layers,
    apply_rules,
    apply_updates,
    assign_rules,
    has_updates,
    layer_metrics,
    loss_terms,
    named_layers,
    param_labels,
    param_name,
    rule_specs,
    snapshot_changes,
    snapshots,
    sparse_layers,
    transform_slots,
)
from sparsejax.nn.slots import (
    TransformHost,
    TransformMetrics,
    TransformParam,
    TransformSlot,
    TransformState,
)

__all__ = ["ACTIVATIONS", "BATCH_AXES", "Activation", "Attention", "Embed", "LayerNorm", "Linear",
           "PackedState", "RMSNorm", "TransformHost", "TransformMetrics", "TransformParam",
           "TransformSlot", "TransformState", "WeightOverride", "analog_layers", "apply_rules",
           "apply_updates", "assign_rules", "dropout", "has_updates", "layer_metrics",
           "loss_terms", "named_layers", "pack_model", "param_labels", "param_name", "rule_specs",
           "snapshot_changes", "snapshots", "shard_batch", "sparse_layers", "tap_attention",
           "tap_linear_inputs", "transform_slots"]
