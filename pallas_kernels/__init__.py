"""Fused residual-block kernels in Pallas with pure-jnp references.

Every op has one public function taking ``implementation=None | "xla" | "pallas"``:
None picks the fastest supported implementation and falls back to XLA."""

from pallas_kernels._sharding import batch_sharding, set_batch_sharding
from pallas_kernels.batchnorm import batch_norm_act
from pallas_kernels.convfirst_block import (
    BatchStats,
    ConvFirstBlockParams,
    ConvFirstTrainParams,
    GroupedConvConfig,
    MBConvBlockParams,
    MBConvTrainParams,
    convfirst_block,
    convfirst_block_reference,
    convfirst_block_train,
    convfirst_stage,
    grouped_conv,
    grouped_conv_reference,
    mbconv_block,
    mbconv_block_reference,
    mbconv_block_train,
    mbconv_stage,
)
from pallas_kernels.convnext_block import (
    ConvNeXtBlockParams,
    convnext_block,
    convnext_block_reference,
)

__all__ = [
    "BatchStats", "ConvFirstBlockParams", "MBConvTrainParams", "ConvFirstTrainParams", "ConvNeXtBlockParams", "GroupedConvConfig", "MBConvBlockParams",
    "convfirst_block", "convfirst_block_reference", "convfirst_block_train", "convfirst_stage", "convnext_block",
    "convnext_block_reference", "grouped_conv", "grouped_conv_reference",
    "mbconv_block", "mbconv_block_reference", "mbconv_block_train", "mbconv_stage",
    "batch_norm_act", "batch_sharding",
    "set_batch_sharding",
]
