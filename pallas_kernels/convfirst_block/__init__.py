"""Fused ConvFirst and MBConv blocks (inference form, BatchNorm folded)."""

from pallas_kernels.convfirst_block.api import convfirst_block, mbconv_block
from pallas_kernels.convfirst_block.reference import (
    GROUP_WIDTH,
    ConvFirstBlockParams,
    MBConvBlockParams,
    convfirst_block_reference,
    grouped_conv,
    mbconv_block_reference,
)

__all__ = ["GROUP_WIDTH", "ConvFirstBlockParams", "MBConvBlockParams", "convfirst_block",
           "convfirst_block_reference", "grouped_conv", "mbconv_block",
           "mbconv_block_reference"]
