"""Fused residual-block kernels in Pallas with pure-jnp references."""

from pallas_kernels.convnext_block import (
    ConvNeXtBlockParams,
    convnext_block,
    convnext_block_reference,
)

__all__ = ["ConvNeXtBlockParams", "convnext_block", "convnext_block_reference"]
