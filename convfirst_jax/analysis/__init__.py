"""The paper's analysis tools.

* ``counts``: analytic counts (parameters, multiply-adds, FLOPs, minimum DRAM bytes) per
  layer and per block, from shapes alone;
* ``devices``: datasheet ceilings (peak FLOP/s, DRAM bandwidth) and ``measure_ceilings``;
* ``waterline``: roofline floors per kernel and the model's waterline for the unfused
  (one kernel per layer) and fused (one kernel per block) partitions;
* ``measure``: block-by-block and whole-model timings on the current device;
* ``plots``: efficiency-gap and roofline plots;
* ``python -m convfirst_jax.analysis``: all of it from the command line.

``measure`` and ``plots`` are imported on demand (they pull in tqdm / matplotlib).
"""

from convfirst_jax.analysis.counts import (
    ELEMENTWISE_FLOPS,
    BlockCount,
    LayerCount,
    block_counts,
    layer_counts,
    summary_rows,
)
from convfirst_jax.analysis.devices import DEVICES, Device, get_device, measure_ceilings
from convfirst_jax.analysis.waterline import (
    BlockFloor,
    KernelFloor,
    Waterline,
    analyze,
    kernel_floor,
    layer_floor,
)

__all__ = ["DEVICES", "ELEMENTWISE_FLOPS", "BlockCount", "BlockFloor", "Device", "KernelFloor",
           "LayerCount", "Waterline", "analyze", "block_counts", "get_device", "kernel_floor",
           "layer_counts", "layer_floor", "measure_ceilings", "summary_rows"]
