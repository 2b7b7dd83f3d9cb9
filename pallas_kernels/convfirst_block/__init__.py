"""Fused ConvFirst and MBConv blocks (inference form, BatchNorm folded), the ConvFirst
training block (batch-statistics BatchNorm folded into the Mosaic pointwise kernels), and
the Pallas group-width-8 convolution layer (ConvFirstNet's MBConv blocks in training with
``block_impl="pallas"``)."""

from pallas_kernels.convfirst_block.api import (
    convfirst_block,
    convfirst_stage,
    mbconv_block,
    mbconv_stage,
)
from pallas_kernels.convfirst_block.grouped_conv_triton import GroupedConvConfig, grouped_conv
from pallas_kernels.convfirst_block.reference import (
    GROUP_WIDTH,
    ConvFirstBlockParams,
    MBConvBlockParams,
    convfirst_block_reference,
    mbconv_block_reference,
)
from pallas_kernels.convfirst_block.reference import grouped_conv as grouped_conv_reference
from pallas_kernels.convfirst_block.train import (
    BatchStats,
    ConvFirstTrainParams,
    convfirst_block_train,
)
from pallas_kernels.convfirst_block.train_mbconv import MBConvTrainParams, mbconv_block_train

__all__ = ["GROUP_WIDTH", "BatchStats", "ConvFirstBlockParams", "ConvFirstTrainParams",
           "convfirst_block_train", "GroupedConvConfig", "MBConvBlockParams",
           "MBConvTrainParams", "mbconv_block_train",
           "convfirst_block", "convfirst_block_reference", "convfirst_stage", "grouped_conv",
           "grouped_conv_reference", "mbconv_block", "mbconv_block_reference", "mbconv_stage"]
