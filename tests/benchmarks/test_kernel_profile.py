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


def test_kernel_kinds_and_summary():
  """Names from a real ConvNeXt-T training-step trace (H100, 2026-11-26) land in the right
  kind; the summary adds time and launches per kind and counts the launch-bound ones."""
  kinds = {
      "anonymous_mosaic_gpu_kernel": "Mosaic GPU kernels",
      "depthwise_conv__7": "Pallas-Triton kernels",
      "depthwise_conv_wgrad": "Pallas-Triton kernels",
      "wgrad2d_c1_k1_nhwc": "cuDNN convolutions",
      "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tiles":
          "cuDNN convolutions",
      "nvjet_sm90_tss_192x96_64x5_1x2_h_bz_NTT": "GEMMs (cuBLAS, XLA's GEMM fusions)",
      "gemm_fusion_dot_81": "GEMMs (cuBLAS, XLA's GEMM fusions)",
      "memcpy32_post": "memory copies",
      "input_reduce_fusion_58": "XLA fusions (elementwise, reductions, transposes)",
      "loop_convert_multiply_fusion_2": "XLA fusions (elementwise, reductions, transposes)",
      "some_library_kernel": "other",
  }
  for name, kind in kinds.items():
    assert kernel_profile.category(name) == kind, name
  us = {"anonymous_mosaic_gpu_kernel": 300.0, "fusion_1": 12.0, "fusion_2": 6.0,
        "depthwise_conv": 50.0}
  launches = {"anonymous_mosaic_gpu_kernel": 2, "fusion_1": 4, "fusion_2": 1,
              "depthwise_conv": 1}
  rows = kernel_profile.by_category(us, launches)
  assert [r["category"] for r in rows] == ["Mosaic GPU kernels", "Pallas-Triton kernels",
                                           "XLA fusions (elementwise, reductions, transposes)"]
  assert rows[2] == dict(category=rows[2]["category"], us=18.0, launches=5, small_launches=5)
  assert rows[0]["small_launches"] == 0


def test_every_pallas_triton_kernel_name_is_known():
  """The kinds summary recognises the Pallas-Triton kernels by name: every pallas_call
  name in pallas_kernels/ must be in PALLAS_TRITON_NAMES (or be a Mosaic kernel's)."""
  import pathlib
  import re
  root = pathlib.Path(kernel_profile.__file__).resolve().parents[1] / "pallas_kernels"
  names = set()
  for path in root.rglob("*.py"):
    names |= set(re.findall(r'(?<!\w)name="([a-z0-9_]+)"', path.read_text()))
  assert names, "no pallas_call names found"
  assert names <= kernel_profile.PALLAS_TRITON_NAMES, names
