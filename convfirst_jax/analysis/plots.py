"""Efficiency-gap and roofline plots (matplotlib, Agg backend, PNG).

Both take a ``Waterline`` and, optionally, the block timings of ``measure_blocks``; without
timings they show the analytic floors only.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from convfirst_jax.analysis.waterline import Waterline  # noqa: E402

GAP_YLABEL = "time per block (µs)"
GAP_XLABEL = "block group (in execution order)"
ROOF_XLABEL = "operational intensity (FLOP / DRAM byte)"
ROOF_YLABEL = "throughput (TFLOP/s)"
MEASURED_STYLE = {"xla": dict(marker="o", color="tab:red"),
                  "pallas": dict(marker="s", color="tab:green")}


def short_name(name: str) -> str:
  parts = name.split(".")
  if parts[0] != "stages":
    return name
  if parts[2] == "downsample":
    return f"s{parts[1]}.ds"
  return f"s{parts[1]}.b{parts[3]}"


def _measured(block_times, name, impl):
  if not block_times or name not in block_times or impl not in block_times[name]:
    return None
  return block_times[name][impl].seconds


def _describe(w: Waterline) -> str:
  return f"batch {w.batch}, {w.image_size}px, {w.dtype}, {w.device.name}"


def efficiency_gap_figure(w: Waterline, block_times=None):
  """Per block group: the fused and unfused floors and the measured XLA / Pallas times."""
  blocks = w.blocks
  xs = list(range(len(blocks)))
  fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(blocks) + 3), 5), layout="constrained")
  ax.step(xs, [b.unfused_s * 1e6 for b in blocks], where="mid", color="tab:orange",
          label="floor, unfused (one kernel per layer)")
  ax.step(xs, [b.fused.time_s * 1e6 for b in blocks], where="mid", color="tab:blue",
          label="floor, fused (one kernel per block)")
  for impl, style in MEASURED_STYLE.items():
    pts = [(x, _measured(block_times, b.name, impl)) for x, b in zip(xs, blocks)]
    pts = [(x, t * 1e6) for x, t in pts if t is not None]
    if pts:
      ax.plot(*zip(*pts), linestyle="none", label=f"measured, {impl.upper() if impl == 'xla' else 'Pallas'}",
              **style)
  ax.set_yscale("log")
  ax.set_xticks(xs, [short_name(b.name) for b in blocks], rotation=90, fontsize=8)
  ax.set_xlabel(GAP_XLABEL)
  ax.set_ylabel(GAP_YLABEL)
  title = f"{w.model}: efficiency gap ({_describe(w)})"
  if not block_times:
    title += ", analytic floors only"
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def roofline_figure(w: Waterline, block_times=None):
  """Operational intensity vs throughput per block group, under the two ceilings.

  Floors sit on the roof: the fused kernel at its fused intensity, the unfused layers at
  the group's unfused intensity (their time is the sum of the layers' floors).  Measured
  points are drawn at the fused intensity: the FLOPs are the same, so their height is
  FLOPs / measured time."""
  peak = w.device.peak(w.dtype)
  bw = w.device.dram_bandwidth
  fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
  fused_i = [b.fused.intensity for b in w.blocks]
  unfused_i = [b.unfused_intensity for b in w.blocks]
  ridge = peak / bw
  lo = min(unfused_i + fused_i + [ridge]) / 3
  hi = max(unfused_i + fused_i + [ridge]) * 3
  ax.plot([lo, ridge, hi], [lo * bw / 1e12, peak / 1e12, peak / 1e12], color="black",
          label=f"ceilings: {peak / 1e12:.0f} TFLOP/s, {bw / 1e12:.2f} TB/s")
  ax.scatter(unfused_i, [b.count.flops / b.unfused_s / 1e12 for b in w.blocks],
             facecolors="none", edgecolors="tab:orange", label="floor, unfused")
  ax.scatter(fused_i, [b.fused.flops / b.fused.time_s / 1e12 for b in w.blocks],
             facecolors="none", edgecolors="tab:blue", label="floor, fused")
  for impl, style in MEASURED_STYLE.items():
    pts = [(b.fused.intensity, b.count.flops / t / 1e12) for b in w.blocks
           if (t := _measured(block_times, b.name, impl)) is not None]
    if pts:
      ax.scatter(*zip(*pts), label=f"measured, {impl.upper() if impl == 'xla' else 'Pallas'}",
                 color=style["color"], marker=style["marker"])
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(ROOF_XLABEL)
  ax.set_ylabel(ROOF_YLABEL)
  ax.set_title(f"{w.model}: roofline ({_describe(w)})", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def roofline_path(path: str) -> str:
  """The roofline plot's file name next to the efficiency-gap plot's: a.png -> a_roofline.png."""
  stem, dot, ext = path.rpartition(".")
  return f"{stem}_roofline.{ext}" if dot else f"{path}_roofline.png"


def save_plots(w: Waterline, path: str, block_times=None, dpi: int = 120) -> list[str]:
  """Writes the efficiency-gap plot to ``path`` and the roofline to ``roofline_path(path)``."""
  paths = []
  for fig, p in ((efficiency_gap_figure(w, block_times), path),
                 (roofline_figure(w, block_times), roofline_path(path))):
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    paths.append(p)
  return paths
