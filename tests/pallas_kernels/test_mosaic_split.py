"""The split Mosaic GPU forward (pallas_kernels.mosaic_split: LN + fc1 + GELU, then fc2 +
residual, the hidden activation through DRAM) in the Mosaic GPU interpreter on CPU, and the
ConvNeXt block forward at C > 256 built on it.

As in test_mosaic_mlp.py, the interpreter starts every buffer (shared memory, outputs and
the intermediate h) as NaN, so anything unwritten shows up; the references run in float32
on the same bf16-rounded inputs, agreement is to bf16 precision.  The compiled kernels are
checked on the GPU by the ``gpu`` tests at the end (and by ``python -m benchmarks.blocks``)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import convnext_block, convnext_block_reference
from pallas_kernels import mosaic_mlp, mosaic_split
from pallas_kernels.convnext_block import api, tuning
from pallas_kernels.convnext_block import mosaic as convnext_mosaic

from tests.pallas_kernels.test_mosaic_mlp import (
    BF16_TOL,
    _rel,
    check_against_reference,
    check_common_errors,
    check_race_free,
)
from tests.pallas_kernels.test_mosaic_mlp import _mlp_inputs as _inputs
from tests import rand


@pytest.mark.parametrize("m,c,e,act,normalize,kw", [
    (64, 384, 128, "gelu", True, {}),                     # ConvNeXt-T stage 3 width: 2 x 192
    (100, 128, 256, "gelu", True, dict(block_n=64, col_block=64)),  # padded rows, blocks
    (130, 192, 384, "silu", False, dict(hidden_chunk=32, project_stages=2)),
    (64, 64, 128, "gelu", True, dict(stages=1, project_stages=4)),  # fewer steps than stages
    # 128-row CTAs (rows padded to 256; C=384 as tuned: project 128 x 192)
    (130, 128, 256, "gelu", True, dict(expand_block_m=128, project_block_m=128, block_n=64)),
    # 128-row expand CTAs at C=384: one output staging tile (two do not fit)
    (70, 384, 128, "gelu", True, dict(expand_block_m=128, project_block_m=128, block_n=192)),
    # two hidden slices of 32 per expand step (C=384: 2 column blocks), padded rows
    (100, 384, 256, "gelu", True, dict(expand_pipelined=True)),
    (64, 128, 512, "silu", False, dict(expand_pipelined=True, hidden_chunk=64, stages=3)),
])
def test_split_mlp_matches_reference(m, c, e, act, normalize, kw):
  check_against_reference(mosaic_split.split_mlp, _inputs(m + c, m, c, e), act, normalize,
                          **kw)


@pytest.mark.parametrize("m,c,e,act,normalize,kw", [
    # C=384 (two column blocks) with LayerNorm: 32-wide slices, 2 slots per warpgroup
    (70, 384, 256, "gelu", True, dict(expand_ws_slots=2)),
    # ... one 64-wide slot per warpgroup: a 64-row staging tile each, halves in turn
    (150, 384, 384, "gelu", True, dict(expand_ws_slots=1)),
    # one 64-wide slot per warpgroup, 6 slices (3 per warpgroup: slots refilled), padded rows
    (130, 128, 384, "silu", False, dict(expand_ws_slots=1, hidden_chunk=64)),
    # fewer slices than slots: nothing refilled
    (64, 64, 128, "gelu", True, dict(expand_ws_slots=2, hidden_chunk=32)),
])
def test_split_mlp_warp_specialised_expand(m, c, e, act, normalize, kw):
  """The warp-specialised expand kernel (two compute warpgroups on alternate hidden slices,
  a TMA warpgroup) inside split_mlp, against the reference."""
  check_against_reference(mosaic_split.split_mlp, _inputs(m + c + 7, m, c, e), act,
                          normalize, **kw)


def test_warp_specialised_expand_matches_the_single_warpgroup_kernel():
  """Same slices, same bias row mask (MBConv's use): both expand kernels give the same h."""
  m, c, e = 256, 128, 512
  ks = jax.random.split(jax.random.key(11), 4)
  z = rand.normal(ks[0], (m, c)).astype(jnp.bfloat16)
  w1 = rand.normal(ks[1], (c, e)) / c ** 0.5
  b1 = rand.normal(ks[2], (e,))
  mask = (jax.random.uniform(ks[3], (m,)) > 0.4).astype(jnp.float32)
  kw = dict(hc=64, cb=128, act="silu", normalize=False, eps=1e-6, stages=2, bm=128,
            bias_row_mask=mask, interpret=mosaic_mlp._interpret_params(True))
  ws = mosaic_split.expand_call(z, None, w1, b1, ws_slots=1, **kw)
  one = mosaic_split.expand_call(z, None, w1, b1, staging=1, **kw)
  want = jax.nn.silu(z.astype(jnp.float32) @ w1.astype(jnp.bfloat16).astype(jnp.float32)
                     + mask[:, None] * b1)
  assert _rel(ws, want) < BF16_TOL
  assert _rel(ws, one) < 1e-2  # the same sums, rounded to bf16 once
  assert not bool(jnp.isnan(ws).any())


@pytest.mark.parametrize("c,e,kw", [(64, 256, dict(hidden_chunk=32)), (384, 256, {})])
def test_warp_specialised_expand_has_no_races(c, e, kw):
  """Race detector: slots refilled by the TMA warpgroup after each compute warpgroup's
  "consumed" arrival, per-warpgroup staging tiles reused after their TMA stores read them
  (C=384: one 64-row tile per warpgroup, written twice per slice), the LayerNorm halves
  joined by a barrier before the first wgmma."""
  if c == 384:
    assert mosaic_split.choose_ws_tiles(c, e, 1, has_zb=True) == (64, 1)
  check_race_free(functools.partial(mosaic_split.split_mlp, expand_ws_slots=1, **kw),
                  _inputs(8, 128, c, e))


def test_warp_specialised_expand_shared_memory_against_the_compiler():
  """``expand_ws_smem_bytes`` against Mosaic GPU's own check (CUDA lowering on a CPU):
  MBConv's C=384 use (row mask, one 64-wide slot per warpgroup) fits; with zb (LayerNorm) it
  would not (the compiler counted 234,608 bytes), and split_mlp then takes 32-wide slices."""
  assert mosaic_split.expand_ws_smem_bytes(384, 64, 1, row_mask=True) <= mosaic_split.SMEM_BYTES
  assert mosaic_split.expand_ws_smem_bytes(384, 64, 1, has_zb=True) > mosaic_split.SMEM_BYTES
  assert mosaic_split.choose_ws_tiles(384, 1536, 1, row_mask=True) == (64, 2)
  assert mosaic_split.choose_ws_tiles(384, 1536, 1, has_zb=True) == (64, 1)
  assert mosaic_split.choose_ws_tiles(384, 1536, 2, has_zb=True) == (32, 2)
  assert mosaic_split.choose_ws_tiles(768, 3072, 1, row_mask=True) is None
  z = jax.ShapeDtypeStruct((31232, 384), jnp.bfloat16)
  w1, b1, mask = jnp.zeros((384, 1536)), jnp.zeros((1536,)), jnp.zeros((31232,))
  jax.jit(lambda z: mosaic_split.expand_call(
      z, None, w1, b1, hc=64, cb=192, act="silu", normalize=False, eps=1e-6, stages=2,
      bm=128, bias_row_mask=mask, ws_slots=1,
      compiler_params=plgpu.CompilerParams(approx_math=True))).trace(z).lower(
          lowering_platforms=("cuda",))


def test_split_mlp_float16_no_row_scale_no_bias():
  a = _inputs(3, 64, 64, 128, jnp.float16)
  del a["row_scale"], a["z_bias"]
  check_against_reference(mosaic_split.split_mlp, a)


@pytest.mark.parametrize("kw", [{}, dict(expand_pipelined=True)])
def test_split_mlp_has_no_races(kw):
  """Race detector over both kernels: the expand kernel's double-buffered TMA stores of h
  (4 chunks through 2 staging tiles; pipelined: two per step), the project kernel's slots
  released one step late.  (The interpreter runs wgmma synchronously.)"""
  check_race_free(functools.partial(mosaic_split.split_mlp, **kw), _inputs(4, 128, 64, 256))


def test_split_mlp_one_staging_tile_has_no_races(monkeypatch):
  """With one output staging tile the expand kernel must wait for the previous chunk's TMA
  store to finish reading it before overwriting it."""
  monkeypatch.setattr(mosaic_split, "choose_staging", lambda *a, **k: 1)
  assert mosaic_split.choose_staging(384, 64, 2, 128) == 1
  check_race_free(functools.partial(mosaic_split.split_mlp, hidden_chunk=64),
                  _inputs(6, 128, 64, 256))


def test_split_mlp_errors_name_the_problem():
  a = _inputs(5, 64, 64, 128)
  check_common_errors(mosaic_split.split_mlp, a)
  b = _inputs(5, 64, 96, 384)
  with pytest.raises(NotImplementedError, match="multiple of 64, got C=96"):
    mosaic_split.split_mlp(**b, interpret=True)
  with pytest.raises(ValueError, match="block_n=48"):
    mosaic_split.split_mlp(**a, block_n=48, interpret=True)
  with pytest.raises(ValueError, match="block_n=96 must be a multiple of 64"):
    mosaic_split.split_mlp(**_inputs(5, 64, 192, 256), block_n=96, interpret=True)
  with pytest.raises(ValueError, match="project_stages"):
    mosaic_split.split_mlp(**a, project_stages=1, interpret=True)
  with pytest.raises(ValueError, match="project_block_m must be 64 or 128, got 96"):
    mosaic_split.split_mlp(**a, project_block_m=96, interpret=True)
  with pytest.raises(ValueError, match="even number of hidden slices"):
    mosaic_split.split_mlp(**_inputs(5, 64, 64, 192), hidden_chunk=64, expand_pipelined=True,
                           interpret=True)
  with pytest.raises(ValueError, match="two different expand kernels"):
    mosaic_split.split_mlp(**a, expand_ws_slots=1, expand_pipelined=True, interpret=True)
  with pytest.raises(ValueError, match="expand_ws_slots=1 .* does not fit"):
    mosaic_split.split_mlp(**_inputs(5, 64, 768, 256), expand_ws_slots=1, interpret=True)
  with pytest.raises(ValueError, match="multiple of 2 x hidden_chunk"):
    mosaic_split.split_mlp(**_inputs(5, 64, 64, 192), expand_ws_slots=1, hidden_chunk=64,
                           interpret=True)
  with pytest.raises(ValueError, match="expand_block_m=128 .* does not fit"):
    mosaic_split.split_mlp(**_inputs(5, 64, 768, 256), expand_block_m=128, interpret=True)
  # C=1536 (ConvNeXt-XL's last stage) with 4 stages does not fit shared memory
  reason = mosaic_split.unsupported_reason(64, 1536, 6144, jnp.bfloat16, stages=4)
  assert "shared memory" in reason
  assert mosaic_split.choose_hidden_chunk(384, 2) == 64
  assert mosaic_split.choose_hidden_chunk(768, 2) == 32


@pytest.mark.parametrize("shape,pipelined,expand_ws", [
    ((1, 3, 5, 384), False, 0), ((2, 2, 3, 256), False, 0), ((1, 3, 5, 384), True, 0),
    ((1, 3, 5, 384), False, 2)])
def test_convnext_block_forward_through_split(shape, pipelined, expand_ws, monkeypatch):
  """The public entry point with the split Mosaic forward (the default tiles at C=384;
  odd H and W, batch 1 and 2, drop-path scale per sample; ``mosaic_pipelined`` and
  ``mosaic_expand_ws`` reach the expand kernel, the latter from EXPAND_WS_MIN_ROWS rows)."""
  # (split_mlp is called from the un-jitted mosaic.forward: its spy sees every call, where
  # one inside split_mlp's jit would miss calls its trace cache answers)
  seen = []
  real = mosaic_split.split_mlp
  monkeypatch.setattr(mosaic_split, "split_mlp",
                      lambda *a, **k: seen.append(k["expand_ws_slots"]) or real(*a, **k))
  if expand_ws:
    rows = shape[0] * shape[1] * shape[2]
    monkeypatch.setattr(convnext_mosaic, "EXPAND_WS_MIN_ROWS", rows + 1)
    x0 = jnp.zeros(shape, jnp.bfloat16)
    p0 = tuning.reference_params(jax.random.key(0), shape[-1])
    t0 = dataclasses.replace(tuning.get_tiles(shape[-1], x0.dtype), fwd_kernel="mosaic_split",
                             mosaic_expand_ws=expand_ws)
    jax.eval_shape(lambda x: convnext_block(x, p0, implementation="pallas", interpret=True,
                                            tiles=t0), x0)
    assert seen.pop() == 0  # below the threshold: the single-warpgroup kernel
    monkeypatch.setattr(convnext_mosaic, "EXPAND_WS_MIN_ROWS", rows)
  c = shape[-1]
  kx, kp, kd = jax.random.split(jax.random.key(c), 3)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  params = tuning.reference_params(kp, c)
  dps = jax.random.uniform(kd, (shape[0],)) + 0.5
  tiles = dataclasses.replace(tuning.get_tiles(c, x.dtype), fwd_kernel="mosaic_split",
                              mosaic_pipelined=pipelined, mosaic_expand_ws=expand_ws)
  assert api.forward_kernel(x.shape, x.dtype, params, tiles, True) == "mosaic_split"
  got = convnext_block(x, params, dps, implementation="pallas", interpret=True, tiles=tiles)
  assert seen.pop() == expand_ws
  want = convnext_block_reference(x.astype(jnp.float32), params, dps)
  assert _rel(got, want) < BF16_TOL
  xla = convnext_block_reference(x, params, dps)
  assert _rel(got, want) <= 1.5 * _rel(xla, want) + 1e-3


def test_split_forward_kernel_choice():
  p384 = tuning.reference_params(jax.random.key(0), 384)
  t = tuning.heuristic_tiles(384, jnp.bfloat16)
  assert (t.fwd_kernel, t.auto) == ("mosaic_split", "hybrid")
  # 513-768 channels in bfloat16: the H100 table's C=768 entry (split forward, XLA's block
  # with the Pallas conv and kernel gradient when differentiated); XLA above and in float32
  t768 = tuning.heuristic_tiles(768, jnp.bfloat16)
  assert t768 == tuning.TUNED[(768, "bfloat16", tuning._H100)]
  t640 = tuning.heuristic_tiles(640, jnp.bfloat16)
  assert (t640.fwd_kernel, t640.auto, t640.mosaic_dwconv_wgrad, t640.mosaic_block_n) == (
      "mosaic_split", "hybrid", "pallas_columns", 0)
  assert tuning.heuristic_tiles(768, jnp.float32).auto == "xla"
  assert tuning.heuristic_tiles(1024, jnp.bfloat16).auto == "xla"
  # 128-row project CTAs only with 192 channels (a 128 x 256 accumulator spills)
  assert (t.mosaic_project_block_m, t.mosaic_block_n) == (128, 192)
  for c in (320, 512):
    t2 = tuning.heuristic_tiles(c, jnp.bfloat16)
    assert (t2.fwd_kernel, t2.mosaic_project_block_m, t2.mosaic_block_n) == (
        "mosaic_split", 64, 0)
  assert api.forward_kernel((1, 5, 5, 384), jnp.bfloat16, p384, t, True) == "mosaic_split"
  assert api.forward_kernel((1, 5, 5, 384), jnp.float32, p384, t, True) == "triton"
  p96 = tuning.reference_params(jax.random.key(0), 96)
  assert api.forward_kernel((1, 5, 5, 96), jnp.bfloat16, p96, t, True) == "triton"
  reason = convnext_mosaic.unsupported_reason((1, 5, 5, 96), p96, jnp.bfloat16, split=True)
  assert "multiple of 64" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 14, 14, 384), (1, 7, 9, 768), (3, 5, 5, 256)])
def test_compiled_split_kernels_on_gpu(shape):
  """The compiled kernels on a Hopper GPU: ConvNeXt-T's stage 3 and 4 widths (768: hidden
  slices of 32) and a padded row count, vs the float32 reference of the whole block."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  c = shape[-1]
  kx, kp, kd = jax.random.split(jax.random.key(c), 3)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  params = tuning.reference_params(kp, c)
  dps = jax.random.uniform(kd, (shape[0],)) + 0.5
  got = convnext_mosaic.forward(x, params, dps, split=True, stages=2)
  want = convnext_block_reference(x.astype(jnp.float32), params, dps)
  assert _rel(got, want) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m,c,e", [(2 * 14 * 14, 384, 1536), (7 * 9 + 3, 768, 3072)])
def test_compiled_pipelined_expand_on_gpu(m, c, e):
  """``expand_pipelined=True`` compiled (two accumulators per step).  C=768's default would
  be slices of 16, below the multiple of 32 the kernels take, so it runs 32-wide slices with
  one weight stage (two stages of 64 W1^T rows do not fit next to its z tile)."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  a = _inputs(c, m, c, e)
  kw = dict(hidden_chunk=32, stages=1) if c == 768 else {}
  got = mosaic_split.split_mlp(**a, expand_pipelined=True, **kw)
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(jnp.float32) for k, v in a.items()})
  assert _rel(got, want) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m,c,e,kw", [(2 * 14 * 14 + 5, 384, 1536, dict(expand_ws_slots=2)),
                                      (3 * 7 * 7, 128, 512, dict(expand_ws_slots=1))])
def test_compiled_warp_specialised_expand_on_gpu(m, c, e, kw):
  """The warp-specialised expand kernel compiled: C=384 with LayerNorm (32-wide slices, 2
  slots), C=128 with one 64-wide slot, padded row counts."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  a = _inputs(c + 1, m, c, e)
  got = mosaic_split.split_mlp(**a, **kw)
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(jnp.float32) for k, v in a.items()})
  assert _rel(got, want) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 56, 56, 96), (3, 28, 28, 192), (2, 14, 14, 384),
                                   (1, 9, 13, 384)])
def test_public_block_forward_on_gpu(shape):
  """``convnext_block(implementation="pallas")`` compiled on a Hopper GPU with the default
  tiles: the Pallas depthwise conv followed by the one-kernel (C <= 256) or split (C=384)
  Mosaic forward, vs the float32 reference."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  c = shape[-1]
  kx, kp, kd = jax.random.split(jax.random.key(c + 1), 3)
  x = rand.normal(kx, shape).astype(jnp.bfloat16)
  params = tuning.reference_params(kp, c)
  dps = jax.random.uniform(kd, (shape[0],)) + 0.5
  tiles = tuning.get_tiles(c, x.dtype)
  assert tiles.mosaic_dwconv == "pallas"
  assert api.forward_kernel(x.shape, x.dtype, params, tiles, False) in ("mosaic", "mosaic_split")
  got = convnext_block(x, params, dps, implementation="pallas")
  want = convnext_block_reference(x.astype(jnp.float32), params, dps)
  assert _rel(got, want) < BF16_TOL
