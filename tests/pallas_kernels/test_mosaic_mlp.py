"""Mosaic GPU fused pointwise kernel (pallas_kernels.mosaic_mlp) in the Mosaic GPU
interpreter on CPU, and the ConvNeXt / ConvFirst forwards built on it.

The interpreter starts every buffer (shared memory and outputs) as NaN, so an output row the
kernel fails to write, or a shared-memory tile read before its TMA copy landed, shows up as
NaN; every comparison asserts there is none.  The references run in float32 on the same
bf16-rounded inputs; the kernel rounds the normalised input and the hidden activation to
bf16 (its wgmma operands) and the output to bf16, so agreement is to bf16 precision
(~4e-3 here; the XLA bf16 block differs from the same reference by about as much).
On the GPU the same kernels are checked by ``python -m benchmarks.mosaic_blocks``."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import convfirst_block, convnext_block, convnext_block_reference
from pallas_kernels import mosaic_mlp
from pallas_kernels.convfirst_block import ConvFirstBlockParams
from pallas_kernels.convfirst_block import mosaic as convfirst_mosaic
from pallas_kernels.convfirst_block.api import convfirst_forward_kernel
from pallas_kernels.convfirst_block.reference import convfirst_block_reference
from pallas_kernels.convnext_block import api, tuning
from pallas_kernels.convnext_block import mosaic as convnext_mosaic
from tests import rand

BF16_TOL = 1e-2


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  assert not np.isnan(a).any(), "NaN in the kernel output (unwritten or uninitialised)"
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _mlp_inputs(seed, m, c, e, dtype=jnp.bfloat16):
  k = jax.random.split(jax.random.key(seed), 8)
  n = rand.normal
  return dict(
      z=(n(k[0], (m, c)) * 2 + 0.5).astype(dtype), res=n(k[1], (m, c)).astype(dtype),
      w1=(n(k[2], (c, e)) / c ** 0.5).astype(dtype), b1=n(k[3], (e,)) * 0.1,
      w2=(n(k[4], (e, c)) / e ** 0.5).astype(dtype), b2=n(k[5], (c,)) * 0.1,
      z_bias=n(k[6], (c,)) * 0.1, row_scale=jax.random.uniform(k[7], (m,)) + 0.5)


def check_against_reference(call, a, act="gelu", normalize=True, **kw):
  """``call(**a, interpret=True, ...)`` has z's shape and dtype and matches the float32
  reference on the same (rounded) inputs to bf16 precision."""
  got = call(**a, act=act, normalize=normalize, interpret=True, **kw)
  assert got.shape == a["z"].shape and got.dtype == a["z"].dtype
  want = mosaic_mlp.fused_mlp_reference(
      **{k: v.astype(jnp.float32) for k, v in a.items()}, act=act, normalize=normalize)
  assert _rel(got, want) < BF16_TOL


@pytest.mark.parametrize("m,c,e,act,normalize,kw", [
    (64, 32, 128, "gelu", True, {}),                       # one CTA
    (100, 96, 384, "gelu", True, {}),                      # ConvNeXt-T stage 1; padded rows
    (70, 192, 768, "gelu", True, dict(hidden_chunk=128)),  # stage 2; 6 chunks of 128
    (130, 64, 256, "silu", False, dict(block_m=128, stages=3)),  # ConvFirst E4, 2 WGs
    (200, 192, 768, "gelu", True, dict(block_m=128)),      # warp-specialised, stage 2
    (128, 32, 64, "gelu", True, dict(block_m=128, stages=3)),  # one chunk < stages
    (64, 64, 384, "silu", False, {}),                      # ConvFirst E6
    (100, 96, 384, "gelu", True, dict(pipelined=True)),    # two chunks per step; padded
    (64, 64, 256, "silu", False, dict(pipelined=True, stages=3)),
])
def test_fused_mlp_matches_reference(m, c, e, act, normalize, kw):
  check_against_reference(mosaic_mlp.fused_mlp, _mlp_inputs(m + c, m, c, e), act, normalize,
                          **kw)


def test_fused_mlp_float16_no_row_scale_no_bias():
  a = _mlp_inputs(3, 64, 32, 64, jnp.float16)
  del a["row_scale"], a["z_bias"]
  check_against_reference(mosaic_mlp.fused_mlp, a)


@pytest.mark.parametrize("kw", [dict(block_m=64), dict(block_m=128),
                                dict(block_m=64, pipelined=True)])
def test_fused_mlp_has_no_races(kw):
  """The interpreter's happens-before race detector over TMA copies, barriers and the
  pipelined weight slots (several CTAs; for block_m=128 two compute warpgroups and the
  TMA warpgroup sharing three slots over four hidden chunks; pipelined: slots released one
  step late -- the interpreter runs wgmma synchronously, so this checks the TMA/barrier side
  of that schedule, not the in-flight wgmmas)."""
  check_race_free(lambda interpret, **a: mosaic_mlp.fused_mlp(
      **a, stages=3, interpret=interpret, **kw), _mlp_inputs(4, 256, 32, 256))


def check_race_free(call, a):
  """Runs ``call(interpret=<race-detecting interpreter>, **a)``; asserts no race was found
  and the result matches the float32 reference."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  ipc.reset_gpu_interpret_mode_state()
  got = call(interpret=plgpu.InterpretGPUParams(detect_races=True), **a)
  jax.block_until_ready(got)
  assert not ipc.get_races().races_found
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(jnp.float32) for k, v in a.items()})
  assert _rel(got, want) < BF16_TOL


def check_common_errors(fn, a):
  """Errors every fused_mlp-style entry point gives: float32 activations, a residual of
  another shape, weights that do not fit, an unknown activation."""
  with pytest.raises(NotImplementedError, match="bfloat16/float16.*float32"):
    fn(**{**a, "z": a["z"].astype(jnp.float32), "res": a["res"].astype(jnp.float32)},
       interpret=True)
  with pytest.raises(ValueError, match="res must match"):
    fn(**{**a, "res": a["res"][:10]}, interpret=True)
  with pytest.raises(ValueError, match="weight shapes"):
    fn(**{**a, "w2": a["w2"][:64]}, interpret=True)
  with pytest.raises(ValueError, match="activation"):
    fn(**a, act="relu", interpret=True)


def test_fused_mlp_errors_name_the_problem():
  a = _mlp_inputs(5, 64, 32, 128)
  check_common_errors(mosaic_mlp.fused_mlp, a)
  b = _mlp_inputs(5, 64, 40, 160)
  with pytest.raises(NotImplementedError, match="multiple of 32.*C=40"):
    mosaic_mlp.fused_mlp(**b, interpret=True)
  with pytest.raises(NotImplementedError, match="hidden chunk must be a multiple of 64"):
    mosaic_mlp.fused_mlp(**a, hidden_chunk=32, interpret=True)
  with pytest.raises(NotImplementedError, match="hidden width 128 is not a multiple"):
    mosaic_mlp.fused_mlp(**a, hidden_chunk=192, interpret=True)
  with pytest.raises(ValueError, match="block_m"):
    mosaic_mlp.fused_mlp(**a, block_m=32, interpret=True)
  with pytest.raises(ValueError, match="interpreter"):
    mosaic_mlp.fused_mlp(**a, h_in_smem=False, interpret=True)
  with pytest.raises(ValueError, match="pipelined=True needs block_m=64"):
    mosaic_mlp.fused_mlp(**a, pipelined=True, block_m=128, interpret=True)
  with pytest.raises(ValueError, match="even number of hidden chunks"):
    mosaic_mlp.fused_mlp(**a, pipelined=True, hidden_chunk=128, interpret=True)
  if jax.default_backend() != "gpu":
    assert "GPU backend" in mosaic_mlp.device_unsupported_reason(False)
  assert mosaic_mlp.device_unsupported_reason(True) is None


def test_gelu_is_the_erf_form():
  """The kernels' GELU (x sigmoid(x P(x^2))) against the erf form in float64, to a few float32
  ulp, and its limits: x for large x, 0 for very negative x, no NaN from overflow."""
  from scipy.special import ndtr
  x = np.linspace(-40, 40, 400_001).astype(np.float32)
  y = np.asarray(jax.jit(mosaic_mlp._gelu)(jnp.asarray(x)), np.float64)
  ref = x.astype(np.float64) * ndtr(x.astype(np.float64))
  err = np.abs(y - ref) / np.maximum(1.0, np.abs(x))
  assert err.max() < 1e-6, (err.max(), x[err.argmax()])
  tanh_form = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True), np.float64)
  assert np.abs(tanh_form - ref).max() > 1e-4  # the check can tell the tanh form apart
  big = jnp.array([-1e30, -1e4, -50.0, 50.0, 1e4, 1e30], jnp.float32)
  np.testing.assert_array_equal(np.asarray(mosaic_mlp._gelu(big)),
                                np.array([0, 0, 0, 50, 1e4, 1e30], np.float32))


def test_expand_reference_applies_each_activation():
  """The kernels' float32 reference applies the activation it is asked for (it used to
  give SiLU for anything but "gelu", so an identity expand compared against SiLU), and
  names an unknown one."""
  z = rand.normal(jax.random.key(0), (16, 32))
  w1 = rand.normal(jax.random.key(1), (32, 64)) / 8
  b1 = jnp.linspace(-1, 1, 64)
  h = jnp.dot(z, w1, precision="highest") + b1
  forms = {"identity": h, "silu": jax.nn.silu(h), "gelu": jax.nn.gelu(h, approximate=False),
           "gelu_tanh": jax.nn.gelu(h, approximate=True)}
  assert set(forms) == set(mosaic_mlp.ACTIVATIONS)
  for act, want in forms.items():
    got = mosaic_mlp.expand_reference(z, w1, b1, act=act, normalize=False)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=act)
  with pytest.raises(ValueError, match="relu"):
    mosaic_mlp.expand_reference(z, w1, b1, act="relu")


@pytest.mark.parametrize("shape,pipelined", [((2, 5, 7, 96), False), ((1, 3, 5, 192), False),
                                             ((2, 5, 7, 96), True)])
def test_convnext_block_forward_through_mosaic(shape, pipelined):
  """The public entry point picks the Mosaic kernel for bf16 at ConvNeXt-T's first two
  stage widths (odd H and W, batch 1 and 2, drop-path scale per sample); the tile field
  ``mosaic_pipelined`` reaches the kernel."""
  kx, kp, kd = jax.random.split(jax.random.key(shape[-1]), 3)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  params = tuning.reference_params(kp, shape[-1])
  dps = jax.random.uniform(kd, (shape[0],)) + 0.5
  tiles = tuning.get_tiles(shape[-1], x.dtype)
  if pipelined:
    with pytest.raises(ValueError, match="pipelined=True needs block_m=64"):  # it arrives
      convnext_block(x, params, dps, implementation="pallas", interpret=True,
                     tiles=dataclasses.replace(tiles, mosaic_pipelined=True, mosaic_block_m=128))
    tiles = dataclasses.replace(tiles, mosaic_pipelined=True, mosaic_block_m=64)
  assert api.forward_kernel(x.shape, x.dtype, params, tiles, True) == "mosaic"
  got = convnext_block(x, params, dps, implementation="pallas", interpret=True, tiles=tiles)
  want = convnext_block_reference(x.astype(jnp.float32), params, dps)
  assert _rel(got, want) < BF16_TOL
  # the XLA bf16 block is no closer to the float32 reference than the kernel
  xla = convnext_block_reference(x, params, dps)
  assert _rel(got, want) <= 1.5 * _rel(xla, want) + 1e-3


def test_convnext_forward_kernel_choice():
  params = tuning.reference_params(jax.random.key(0), 96)
  t = tuning.heuristic_tiles(96, jnp.bfloat16)
  assert api.forward_kernel((1, 5, 5, 96), jnp.bfloat16, params, t, True) == "mosaic"
  assert api.forward_kernel((1, 5, 5, 96), jnp.float32, params, t, True) == "triton"
  t_triton = dataclasses.replace(t, fwd_kernel="triton")
  assert api.forward_kernel((1, 5, 5, 96), jnp.bfloat16, params, t_triton, True) == "triton"
  p40 = tuning.reference_params(jax.random.key(0), 40)
  assert api.forward_kernel((1, 5, 5, 40), jnp.bfloat16, p40, t, True) == "triton"
  p384 = tuning.reference_params(jax.random.key(0), 384)
  assert api.forward_kernel((1, 5, 5, 384), jnp.bfloat16, p384, t, True) == "triton"
  with pytest.raises(ValueError, match="fwd_kernel"):
    api.forward_kernel((1, 5, 5, 96), jnp.bfloat16, params, dataclasses.replace(
        t, fwd_kernel="cuda"), True)


def _convfirst_params(key, c, e, k=3):
  ks = jax.random.split(key, 6)
  n = rand.normal
  return ConvFirstBlockParams(
      conv_kernel=n(ks[0], (k, k, 8, c)) / (8 * k * k) ** 0.5, conv_bias=0.1 * n(ks[1], (c,)),
      fc1_kernel=n(ks[2], (c, e * c)) / c ** 0.5, fc1_bias=0.1 * n(ks[3], (e * c,)),
      fc2_kernel=n(ks[4], (e * c, c)) / (e * c) ** 0.5, fc2_bias=0.1 * n(ks[5], (c,)))


@pytest.mark.parametrize("shape,k,e", [((1, 5, 7, 64), 3, 4), ((2, 3, 3, 128), 5, 4)])
def test_convfirst_block_forward_through_mosaic(shape, k, e):
  kx, kp = jax.random.split(jax.random.key(k), 2)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  params = _convfirst_params(kp, shape[-1], e, k)
  assert convfirst_mosaic.unsupported_reason(x.shape, params, x.dtype) is None
  assert convfirst_forward_kernel(x, params, True) == "mosaic"
  got = convfirst_block(x, params, implementation="pallas", interpret=True)
  want = convfirst_block_reference(x.astype(jnp.float32), params)
  assert _rel(got, want) < BF16_TOL
  xla = convfirst_block_reference(x, params)
  assert _rel(got, want) <= 1.5 * _rel(xla, want) + 1e-3


def test_convfirst_forward_kernel_choice():
  params = _convfirst_params(jax.random.key(0), 64, 4)
  x = jnp.zeros((1, 3, 3, 64), jnp.bfloat16)
  assert convfirst_forward_kernel(x, params, True) == "mosaic"
  assert convfirst_forward_kernel(x, params, True, "triton") == "triton"
  assert convfirst_forward_kernel(x.astype(jnp.float32), params, True) == "triton"
  with pytest.raises(NotImplementedError, match="float32"):
    convfirst_forward_kernel(x.astype(jnp.float32), params, True, "mosaic")
  with pytest.raises(ValueError, match="forward_kernel"):
    convfirst_forward_kernel(x, params, True, "cuda")


def test_pipelined_kernel_names_its_shared_memory_limit():
  """At C=192 two pipeline stages of paired weight chunks do not fit a CTA's shared memory
  (the compiler said 249,912 > 232,448 bytes on an H100): a clear error before lowering."""
  a = _mlp_inputs(192, 64, 192, 768)
  with pytest.raises(NotImplementedError, match="shared memory"):
    mosaic_mlp.fused_mlp(**a, pipelined=True, stages=2)
  assert mosaic_mlp.pipelined_smem_bytes(96, 64, 2) <= mosaic_mlp.SMEM_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("m,c,e", [(2 * 56 * 56, 96, 384), (3 * 28 * 28 + 5, 128, 512)])
def test_compiled_pipelined_kernel_on_gpu(m, c, e):
  """``pipelined=True`` compiled, hidden chunks in registers (two accumulators in flight);
  C=192 does not fit (test above), so the odd row count runs at C=128."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  a = _mlp_inputs(c, m, c, e)
  got = mosaic_mlp.fused_mlp(**a, pipelined=True)
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(jnp.float32) for k, v in a.items()})
  assert _rel(got, want) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("shape", [(2, 56, 56, 96), (3, 28, 28, 192), (1, 7, 9, 64)])
def test_compiled_kernel_on_gpu(shape, block_m):
  """The compiled (non-interpreted) kernel on a Hopper GPU, hidden chunk in registers:
  ConvNeXt-T's two supported stage widths and a ConvFirst width with an odd, padded row
  count; outputs compared with the float32 reference of the whole block."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  c = shape[-1]
  kx, kp, kd = jax.random.split(jax.random.key(c), 3)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  dps = jax.random.uniform(kd, (shape[0],)) + 0.5
  if c == 64:
    params = _convfirst_params(kp, c, 4)
    got = convfirst_mosaic.forward(x, params, block_m=block_m)
    want = convfirst_block_reference(x.astype(jnp.float32), params)
  else:
    params = tuning.reference_params(kp, c)
    got = convnext_mosaic.forward(x, params, dps, block_m=block_m, stages=2)
    want = convnext_block_reference(x.astype(jnp.float32), params, dps)
  assert _rel(got, want) < BF16_TOL


@pytest.mark.parametrize("m,c,e,kw", [
    (300, 96, 384, {}),                                   # LayerNorm + GELU, 5 tiles
    (130, 64, 256, dict(act="silu", normalize=False, select_zero_rows=True)),
])
def test_resident_kernel_matches_reference(m, c, e, kw, monkeypatch):
  """The resident-weight kernel (one persistent CTA here, whose one interpreted compute
  warpgroup walks every 64-row tile) against the reference and, exactly, against the
  streaming 64-row kernel."""
  monkeypatch.setattr(mosaic_mlp, "_sm_count", lambda: 1)
  a = _mlp_inputs(c + 5, m, c, e)
  if kw.get("select_zero_rows"):
    a["row_scale"] = (jnp.arange(m) % 3 != 0).astype(jnp.float32)
  got = mosaic_mlp.fused_mlp(**a, resident=True, interpret=True, **kw)
  ref_kw = {k: v for k, v in kw.items() if k != "select_zero_rows"}
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(jnp.float32) for k, v in a.items()},
                                        **ref_kw)
  assert _rel(got, want) < BF16_TOL
  np.testing.assert_array_equal(
      got, mosaic_mlp.fused_mlp(**a, resident=False, interpret=True, **kw))


def test_resident_kernel_has_no_races(monkeypatch):
  """Race detector: the weights loaded once by warpgroup 0 and read by every warpgroup,
  each warpgroup's tiles reloaded only after its epilogue's TMA store has read them."""
  monkeypatch.setattr(mosaic_mlp, "_sm_count", lambda: 1)
  check_race_free(functools.partial(mosaic_mlp.fused_mlp, resident=True),
                  _mlp_inputs(6, 256, 64, 256))


def test_resident_kernel_choice_and_limits():
  """Where the resident-weight kernel runs by default (the weights and 2-3 warpgroups'
  tiles fit shared memory), its shared-memory count against Mosaic GPU's (CUDA lowering
  on a CPU with 3 compute warpgroups at C=96), and its errors."""
  assert mosaic_mlp.RESIDENT
  assert mosaic_mlp.resident_warpgroups(96, 384) == 3      # ConvNeXt-T / convfirst_t C=96
  assert mosaic_mlp.resident_warpgroups(64, 256) == 3
  assert mosaic_mlp.resident_warpgroups(128, 512) == 0
  assert mosaic_mlp.resident_warpgroups(96, 384, max_wg=2) == 2
  assert mosaic_mlp.resident_warpgroups(96, 384, h_in_smem=True) == 2
  z = jax.ShapeDtypeStruct((401408, 96), jnp.bfloat16)
  w1, b1, w2, b2 = jnp.zeros((96, 384)), jnp.zeros((384,)), jnp.zeros((384, 96)), jnp.zeros((96,))
  _lower_for_cuda(lambda z: mosaic_mlp.fused_mlp(z, z, w1, b1, w2, b2, resident=True), z)
  a = _mlp_inputs(7, 64, 192, 768)
  with pytest.raises(NotImplementedError, match="resident=True.*C=192"):
    mosaic_mlp.fused_mlp(**a, resident=True, interpret=True)
  with pytest.raises(ValueError, match="two different kernels"):
    mosaic_mlp.fused_mlp(**_mlp_inputs(7, 64, 64, 256), resident=True, pipelined=True,
                         interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m,c,e,kw", [
    (2 * 56 * 56 + 3, 96, 384, {}),                                    # 3 warpgroups
    (5 * 7 * 7, 64, 256, dict(act="silu", normalize=False, select_zero_rows=True)),
    (64 * 132 * 3 * 2 + 64, 96, 384, dict(act="silu", normalize=False)),  # 3 tiles more
])                                                                     # than one round
def test_compiled_resident_kernel_on_gpu(m, c, e, kw):
  """The resident-weight kernel compiled (3 compute warpgroups at C=96 and 64), padded row
  counts, more tiles than warpgroups in flight (each walks several), the row-mask select,
  against the float32 reference and the 64-row streaming kernel."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  a = _mlp_inputs(c + 2, m, c, e)
  if kw.get("select_zero_rows"):
    a["row_scale"] = (jnp.arange(m) % 4 != 0).astype(jnp.float32)
  assert mosaic_mlp.resident_warpgroups(c, e) == 3
  got = mosaic_mlp.fused_mlp(**a, resident=True, **kw)
  ref_kw = {k: v for k, v in kw.items() if k != "select_zero_rows"}
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(jnp.float32) for k, v in a.items()},
                                        **ref_kw)
  assert _rel(got, want) < BF16_TOL
  np.testing.assert_array_equal(got, mosaic_mlp.fused_mlp(**a, resident=False, **kw))


def test_interpreter_warns_about_async_cpu_dispatch(monkeypatch):
  """Interpreting on XLA:CPU with asynchronous dispatch (jax's default; tests/conftest.py
  turns it off) warns once, naming the setting; without it nothing is said."""
  monkeypatch.setattr(mosaic_mlp, "_ASYNC_WARNED", False)
  monkeypatch.setattr(jax.config, "read", lambda name: name == "jax_cpu_enable_async_dispatch")
  with pytest.warns(RuntimeWarning, match="jax_cpu_enable_async_dispatch"):
    assert isinstance(mosaic_mlp._interpret_params(True), plgpu.InterpretGPUParams)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mosaic_mlp._interpret_params(True)  # once per process
    assert mosaic_mlp._interpret_params(False) is None
    monkeypatch.setattr(mosaic_mlp, "_ASYNC_WARNED", False)
    monkeypatch.setattr(jax.config, "read", lambda name: False)
    params = plgpu.InterpretGPUParams(detect_races=True)
    assert mosaic_mlp._interpret_params(params) is params


def _lower_for_cuda(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_shared_memory_estimate_matches_the_compiler():
  """``fused_smem_bytes`` against Mosaic GPU's own check (its lowering runs on a CPU and
  refuses kernels over 227 KB): C=192 with 128-row CTAs and 2 stages lowers; C=256 with
  them (271,480 bytes, the compiler's figure on an H200 on 2026-11-27, when a ConvNeXt with
  C=256 and block_impl="pallas" failed there) is refused by ``fused_mlp`` itself with a
  message naming shared memory."""
  def call(c, **kw):
    a = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
         for k, v in _mlp_inputs(0, 256, c, 4 * c).items()}
    return _lower_for_cuda(lambda a: mosaic_mlp.fused_mlp(**a, **kw), a)
  assert mosaic_mlp.fused_smem_bytes(192, 768, 64, 2, 128) < mosaic_mlp.SMEM_BYTES
  call(192, block_m=128, stages=2)
  need = mosaic_mlp.fused_smem_bytes(256, 1024, 64, 2, 128)
  assert 271_480 - 4096 < need <= 271_480
  with pytest.raises(NotImplementedError, match="shared memory"):
    call(256, block_m=128, stages=2)
  call(256, block_m=64, stages=2)
  call(256, block_m=128, stages=1)


@pytest.mark.parametrize("device_kind", [None, tuning._H100])
def test_convnext_tiles_fit_shared_memory(device_kind):
  """Every ConvNeXt width's tiles (the H100 table and the heuristic) ask for a one-kernel
  Mosaic forward that fits shared memory, or the split / Triton forms."""
  for c in (40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536):
    t = tuning.get_tiles(c, "bfloat16", device_kind=device_kind or "cpu")
    if t.fwd_kernel == "mosaic" and c % 32 == 0 and c <= mosaic_mlp.MAX_CHANNELS:
      assert mosaic_mlp.unsupported_reason(
          1, c, 4 * c, jnp.bfloat16, t.mosaic_hidden, block_m=t.mosaic_block_m,
          stages=t.mosaic_stages) is None, c


def test_convnext_c256_block_lowers_with_mosaic(monkeypatch):
  """The case that failed on GPUs: a C=256 ConvNeXt block with implementation="pallas",
  forward and forward + backward, through Mosaic GPU's lowering (the GPU check and the
  Triton compute-capability query patched so that it runs on a CPU)."""
  import types
  from jax._src.pallas.triton import pallas_call_registration as registration
  monkeypatch.setattr(mosaic_mlp, "device_unsupported_reason", lambda interpret: None)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info",
                      lambda: types.SimpleNamespace(compute_capability=90))
  p = tuning.reference_params(jax.random.key(0), 256)
  x = jax.ShapeDtypeStruct((2, 8, 8, 256), jnp.bfloat16)
  assert api.forward_kernel(x.shape, x.dtype, p, tuning.get_tiles(256, "bfloat16", "cpu"),
                            False) == "mosaic"
  fwd = lambda x, p: convnext_block(x, p, implementation="pallas")
  _lower_for_cuda(fwd, x, p)
  _lower_for_cuda(jax.grad(lambda x, p: jnp.sum(fwd(x, p).astype(jnp.float32)), (0, 1)), x, p)
