"""Flax NNX layers that the models are built from, and the path rules that configure them.

Models are assembled only from these layers so that path rules can find every linear map
by its module path and give it a transform without touching model code.
"""

from sparsejax.nn.layers import (
    ACTIVATIONS,
    BATCH_AXES,
    MASK_STAT_NAMES,
    Activation,
    AnalogState,
    AnalogWeights,
    Embed,
    LayerNorm,
    Linear,
    LSQQuantizer,
    MaskLogits,
    PackedState,
    QuantState,
    SparsityState,
    dropout,
    pack_model,
    shard_batch,
)
from sparsejax.nn.rules import (
    analog_layers,
    apply_rules,
    assign_rules,
    layer_metrics,
    mask_choice_changes,
    mask_choices,
    mask_layers,
    mask_training_options,
    named_layers,
    quant_metrics,
    quantized_layers,
    regularization_loss,
    sparse_layers,
)

__all__ = ["ACTIVATIONS", "BATCH_AXES", "MASK_STAT_NAMES", "Activation", "AnalogState",
           "AnalogWeights",
           "Embed", "LSQQuantizer", "LayerNorm", "Linear", "MaskLogits", "PackedState",
           "QuantState", "SparsityState", "analog_layers", "apply_rules", "assign_rules",
           "dropout", "layer_metrics", "mask_choice_changes", "mask_choices", "mask_layers",
           "mask_training_options", "named_layers", "pack_model", "quant_metrics",
           "quantized_layers", "regularization_loss", "shard_batch", "sparse_layers"]
