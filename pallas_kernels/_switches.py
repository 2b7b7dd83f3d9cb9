"""The module-level switches that pick kernels while a call is traced, and a ``jax.jit``
whose cache is keyed on them.

Constants such as ``mosaic_gemm.PERSISTENT`` or ``mosaic_gconv.EXPAND_GEMM`` are read when
a function is traced.  A plain ``jax.jit`` entry point (``mosaic_split.split_mlp``,
``mosaic_gconv.mbconv_stage_forward``, ...) caches its trace by its arguments alone, so
after a first call it went on returning the program traced with the old value even inside
a new outer ``jax.jit``: a switch changed to compare two kernels in one process silently
compared a program with itself (benchmarks/RESULTS.md, 2026-11-28, twelfth session).
``jit`` adds the switches' current values to the cache key."""

from __future__ import annotations

import functools
import sys

import jax

# (module, attribute): constants read while tracing that change which kernels run.
SWITCHES = (
    ("pallas_kernels.mosaic_gemm", "PERSISTENT"),
    ("pallas_kernels.mosaic_mlp", "RESIDENT"),
    ("pallas_kernels.convfirst_block.mosaic_gconv", "EXPAND_WS_SLOTS"),
    ("pallas_kernels.convfirst_block.mosaic_gconv", "EXPAND_GEMM"),
    ("pallas_kernels.convfirst_block.mosaic_gconv", "PROJECT_GEMM"),
    ("pallas_kernels.convfirst_block.train", "BWD_BLOCK_M"),
    ("pallas_kernels.convfirst_block.train", "DB1_GEMM"),
    ("pallas_kernels.convfirst_block.train", "DB2_GEMM"),
    ("pallas_kernels.convnext_block.mosaic", "EXPAND_WS_MIN_ROWS"),
    ("pallas_kernels.convnext_block.mosaic", "CONV_BIAS_MIN_C"),
    ("pallas_kernels.convnext_block.dwconv", "DEFAULT_WGRAD"),
)


def values() -> tuple:
  """The switches' current values (None for a module not imported yet)."""
  return tuple(getattr(sys.modules[m], a, None) if m in sys.modules else None
               for m, a in SWITCHES)


def jit(*, static_argnames: tuple[str, ...] = ()):
  """``jax.jit(fn, static_argnames=...)`` that also retraces when a switch changes."""
  def decorate(fn):
    def traced(*args, _switches, **kwargs):
      del _switches  # only part of the cache key
      return fn(*args, **kwargs)

    jitted = jax.jit(traced, static_argnames=(*static_argnames, "_switches"))

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return jitted(*args, _switches=values(), **kwargs)

    return call

  return decorate
