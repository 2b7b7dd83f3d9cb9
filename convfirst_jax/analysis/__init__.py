"""The paper's analysis tools: analytic counts (parameters, multiply-adds, FLOPs, minimum
DRAM bytes) per layer and per block, from shapes alone."""

from convfirst_jax.analysis.counts import (
    ELEMENTWISE_FLOPS,
    BlockCount,
    LayerCount,
    block_counts,
    layer_counts,
    summary_rows,
)

__all__ = ["ELEMENTWISE_FLOPS", "BlockCount", "LayerCount", "block_counts", "layer_counts",
           "summary_rows"]
