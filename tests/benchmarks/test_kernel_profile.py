"""benchmarks.kernel_profile: the per-kernel aggregation (on stand-in trace planes) and the
CPU refusal; the trace itself needs a GPU."""

from __future__ import annotations

from types import SimpleNamespace as NS

import jax
import pytest

from benchmarks import kernel_profile


def _ev(name, ns):
  return NS(name=name, duration_ns=ns)


def test_kernel_times_sums_gpu_stream_events_per_call():
  planes = [
      NS(name="/device:GPU:0", lines=[
          NS(name="Stream #13(compute)", events=[_ev("fusion_1", 3000), _ev("gemm", 8000),
                                                 _ev("fusion_1", 1000), _ev("gemm", 8000)]),
          NS(name="Stream #14(MemcpyD2H)", events=[_ev("memcpy", 50_000)]),
          NS(name="XLA Ops", events=[_ev("fusion_1", 99_000)])]),
      NS(name="/host:CPU", lines=[NS(name="Stream #1", events=[_ev("host", 10**6)])]),
  ]
  us, launches = kernel_profile.kernel_times(planes, calls=2)
  assert us == {"fusion_1": 2.0, "gemm": 8.0}
  assert launches == {"fusion_1": 1, "gemm": 1}


def test_refuses_without_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(SystemExit, match="needs a GPU backend"):
    kernel_profile.main(["block", "--shape", "2,8,8,96"])


def test_trace_writes_and_reads_a_real_profile():
  """On a CPU: jax.profiler writes the trace, it is found and parsed, and the missing GPU
  planes are reported (on a GPU the same call returns the kernels' times)."""
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  fn, args, carry = kernel_profile._block_fn((1, 8, 8, 96), "xla", forward_only=False)
  assert not carry
  with pytest.raises(RuntimeError, match="holds no GPU kernels"):
    kernel_profile.trace(fn, args, calls=1)
