"""Flax NNX layers that the models are built from.

Models are assembled only from these layers so that path rules (``sparsejax.rules``) can
find every linear map by its module path and give it a transform without touching model
code.
"""

from sparsejax.nn.layers import Embed, LayerNorm, Linear, dropout

__all__ = ["Embed", "LayerNorm", "Linear", "dropout"]
