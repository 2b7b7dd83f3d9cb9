"""One wall-clock timer for tuning, analysis and benchmarks.

JAX dispatch is asynchronous, so every timed call ends in ``block_until_ready``; the first
calls (compilation, autotuning, allocation) are warm-up and not timed; the median of many
calls resists outliers.  ``arg_sets`` rotates through several inputs so that repeated calls
do not all hit one input already resident in L2.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax


def median_seconds(fn: Callable, *args, warmup: int = 3, iters: int = 20,
                   arg_sets: Sequence[tuple] | None = None, reps: int = 1) -> float:
  """Median seconds of one call of ``fn(*args)`` (or of ``fn(*a)`` for ``a`` rotating
  through ``arg_sets``), after ``warmup`` untimed calls.  Each of the ``iters`` samples
  dispatches ``reps`` calls back to back, synchronises once and divides by ``reps``
  (reps > 1 keeps the host's dispatch and synchronisation gaps out of sub-millisecond
  kernel times)."""
  if arg_sets is None:
    arg_sets = (args,)
  elif args:
    raise ValueError("pass either positional args or arg_sets, not both")
  if iters < 1 or reps < 1:
    raise ValueError(f"iters and reps must be >= 1, got {iters}, {reps}")
  for i in range(max(warmup, 1)):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    for r in range(reps):
      out = fn(*arg_sets[(i * reps + r) % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def median_ms(fn: Callable, arg_sets: Sequence[tuple], iters: int = 20, reps: int = 10) -> float:
  """``median_seconds`` in milliseconds, warming up once per argument set (the benchmarks'
  kernel timings)."""
  return median_seconds(fn, arg_sets=arg_sets, warmup=len(arg_sets), iters=iters,
                        reps=reps) * 1e3
