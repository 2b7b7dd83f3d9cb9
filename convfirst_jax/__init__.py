"""convfirst-jax: ConvNeXt and ConvFirstNet in Flax NNX with fused-block Pallas kernels.

    import jax, jax.numpy as jnp
    import convfirst_jax as cj
    model = cj.create_model("convnext_tiny", num_classes=10, dtype=jnp.bfloat16)
    logits = model(jnp.zeros((8, 224, 224, 3)))
"""

from convfirst_jax.convfirst import (
    ConvFirstBlock,
    ConvFirstNet,
    FoldedConvFirstBlock,
    FoldedMBConvBlock,
    MBConvBlock,
    fold_batchnorm,
)
from convfirst_jax.convnext import ConvNeXt, ConvNeXtBlock
from convfirst_jax.packing import TreePacker, predictor
from convfirst_jax.registry import create_model, list_models, model_config, register_model

__version__ = "0.1.0"

__all__ = [
    "ConvFirstBlock", "ConvFirstNet", "ConvNeXt", "ConvNeXtBlock", "FoldedConvFirstBlock",
    "FoldedMBConvBlock", "MBConvBlock", "create_model", "fold_batchnorm", "list_models",
    "model_config", "predictor", "register_model", "TreePacker",
]
