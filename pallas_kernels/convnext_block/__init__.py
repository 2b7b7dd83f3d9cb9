"""Fused ConvNeXt block: reference and (GPU) Pallas kernels behind one public function."""

from pallas_kernels.convnext_block.api import convnext_block
from pallas_kernels.convnext_block.reference import (
    ConvNeXtBlockParams,
    convnext_block_reference,
)

__all__ = ["convnext_block", "convnext_block_reference", "ConvNeXtBlockParams"]
