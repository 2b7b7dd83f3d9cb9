"""The K-streaming GEMM forms of the split kernels (pallas_kernels.mosaic_gemm) in the Mosaic
GPU interpreter on CPU, inside split_mlp and MBConv's expand, and compiled on a GPU.

The interpreter starts every buffer as NaN, so unwritten output tiles fail ``_rel``.  Shapes
are small but exercise the edges: several CTAs along rows and columns, more contraction
steps than pipeline slots (slots refilled after the "consumed" barrier) and fewer, a row
mask, rows with a zero row scale whose h is not finite (``select_zero_rows``), one CTA per
tile and persistent CTAs walking several tiles each (an uneven share included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gemm, mosaic_mlp, mosaic_split
from pallas_kernels.convfirst_block import mosaic_gconv

from tests.pallas_kernels.test_mosaic_mlp import BF16_TOL, _rel, check_against_reference
from tests.pallas_kernels.test_mosaic_mlp import _mlp_inputs as _inputs
from tests import rand

f32 = jnp.float32


def _expand_reference(z, zb, w1, b1, act, normalize, mask=None):
  """The float32 reference with the weights as the kernels see them (z's dtype)."""
  return mosaic_mlp.expand_reference(z, w1.astype(z.dtype), b1, z_bias=zb, act=act,
                                     normalize=normalize, bias_row_mask=mask)


@pytest.mark.parametrize("m,c,e,act,normalize,tn,stages,persistent,ctas", [
    # one CTA per tile: 2 x 2 CTAs, 3 steps through 2 slots
    (256, 192, 256, "gelu", True, 128, 2, False, None),
    # one persistent CTA walks 3 column tiles: the slot ring runs on across tiles, the
    # vector slots are refilled after their release
    (128, 192, 192, "silu", False, 64, 2, True, 1),
    (128, 64, 192, "gelu", True, 192, 4, True, None),   # fewer steps than slots; 192 wide
    (384, 128, 256, "gelu", True, 128, 3, True, 4),     # 6 tiles over 4 CTAs (2, 2, 1, 1)
])
def test_expand_matches_reference(m, c, e, act, normalize, tn, stages, persistent, ctas):
  a = _inputs(m + c, m, c, e)
  got = mosaic_gemm.expand(a["z"], a["z_bias"], a["w1"], a["b1"], act=act,
                           normalize=normalize, tn=tn, stages=stages, persistent=persistent,
                           ctas=ctas, interpret=True)
  assert got.shape == (m, e) and got.dtype == a["z"].dtype
  want = _expand_reference(a["z"], a["z_bias"], a["w1"], a["b1"], act, normalize)
  assert _rel(got, want) < BF16_TOL


def test_expand_bias_row_mask():
  """MBConv's form: act(z @ W1 + mask * b1), so rows with z = 0 and mask 0 give silu(0)."""
  m, c, e = 256, 64, 128
  a = _inputs(3, m, c, e)
  mask = (jax.random.uniform(jax.random.key(4), (m,)) > 0.3).astype(f32)
  z = jnp.where(mask[:, None] > 0, a["z"], 0).astype(a["z"].dtype)
  got = mosaic_gemm.expand(z, None, a["w1"], a["b1"], act="silu", normalize=False,
                           bias_row_mask=mask, tn=64, interpret=True)
  assert _rel(got, _expand_reference(z, None, a["w1"], a["b1"], "silu", False, mask)) < BF16_TOL
  assert not bool(jnp.any(got[mask == 0] != 0))


def test_row_stats_with_a_large_common_offset():
  """The one-pass statistics are shifted by each row's first element: a row offset of 300
  with unit spread (z in float32 here, so the offset itself is exact) keeps rstd and the
  mean to float32 precision (an unshifted E[x^2] - E[x]^2 loses ~1e-5 x 300^2 of the 1)."""
  z = rand.normal(jax.random.key(0), (64, 384)) + 300.0
  zb = jnp.linspace(-1, 1, 384)
  rstd, nm = mosaic_gemm.row_stats(z, zb, 1e-6)
  x = np.asarray(z, np.float64) + np.asarray(zb, np.float64)
  mean, var = x.mean(1), x.var(1)
  np.testing.assert_allclose(np.asarray(rstd), 1 / np.sqrt(var + 1e-6), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(nm), mean / np.sqrt(var + 1e-6), rtol=1e-5)


@pytest.mark.parametrize("m,e,c,tn,stages,zero_rows,persistent,ctas", [
    (256, 256, 128, 64, 2, False, True, 3),  # 4 tiles over 3 CTAs, 4 steps through 2 slots
    (128, 128, 192, 192, 3, True, False, None),  # fewer steps than slots; NaN h at scale 0
    # each of 2 CTAs reloads the residual tile 3 times, once the last store has read it
    (384, 128, 128, 64, 2, True, True, 2),
])
def test_project_matches_reference(m, e, c, tn, stages, zero_rows, persistent, ctas):
  ks = jax.random.split(jax.random.key(m + c), 5)
  h = rand.normal(ks[0], (m, e)).astype(jnp.bfloat16)
  w2 = rand.normal(ks[1], (e, c)) / e ** 0.5
  b2 = rand.normal(ks[2], (c,)) * 0.1
  res = rand.normal(ks[3], (m, c)).astype(jnp.bfloat16)
  rs = jax.random.uniform(ks[4], (m,)) + 0.5
  if zero_rows:
    rs = rs.at[::7].set(0.0)
    h[::7] = np.nan
  got = mosaic_gemm.project(h, w2, b2, res, rs, tn=tn, stages=stages,
                            select_zero_rows=zero_rows, persistent=persistent, ctas=ctas,
                            interpret=True)
  assert got.shape == (m, c) and got.dtype == res.dtype
  hf = jnp.where(rs[:, None] == 0, 0.0, h.astype(f32))
  want = res.astype(f32) + rs[:, None] * (
      jnp.dot(hf, w2.astype(jnp.bfloat16).astype(f32), precision="highest") + b2)
  assert _rel(got, want) < BF16_TOL
  if zero_rows:
    np.testing.assert_array_equal(np.asarray(got[::7], np.float32),
                                  np.asarray(res[::7], np.float32))


@pytest.mark.parametrize("m,c,e,act,normalize,kw", [
    (100, 128, 256, "gelu", True, dict(expand_gemm=True)),
    (130, 64, 192, "silu", False, dict(expand_gemm=True, project_gemm=True)),
    (70, 128, 128, "gelu", True, dict(project_gemm=True, project_stages=2)),
])
def test_split_mlp_with_the_gemm_kernels(m, c, e, act, normalize, kw):
  """split_mlp(expand_gemm= / project_gemm=True): rows padded to 128, either kernel or
  both replaced."""
  check_against_reference(mosaic_split.split_mlp, _inputs(m + e, m, c, e), act, normalize,
                          block_n=64, **kw)


@pytest.mark.parametrize("persistent", [False, True])
def test_gemm_expand_has_no_races(persistent):
  """Race detector: slots refilled by the TMA warpgroup after both compute warpgroups'
  "consumed" arrivals (3 steps through 2 slots), the output tiles stored by TMA; with one
  persistent CTA over 3 tiles, also the vector slots refilled after their release and each
  staging tile rewritten after its last store."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  ipc.reset_gpu_interpret_mode_state()
  a = _inputs(5, 128, 192, 192)
  got = mosaic_gemm.expand(a["z"], a["z_bias"], a["w1"], a["b1"], tn=64, stages=2,
                           persistent=persistent, ctas=1,
                           interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(got)
  assert not ipc.get_races().races_found
  want = _expand_reference(a["z"], a["z_bias"], a["w1"], a["b1"], "gelu", True)
  assert _rel(got, want) < BF16_TOL


def test_persistent_project_has_no_races():
  """Race detector: one persistent CTA over 3 tiles, each residual tile loaded into the
  staging tile once the previous tile's store has read it."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  ipc.reset_gpu_interpret_mode_state()
  ks = jax.random.split(jax.random.key(3), 4)
  h = rand.normal(ks[0], (128, 128)).astype(jnp.bfloat16)
  w2 = rand.normal(ks[1], (128, 192)) / 128 ** 0.5
  b2 = rand.normal(ks[2], (192,)) * 0.1
  res = rand.normal(ks[3], (128, 192)).astype(jnp.bfloat16)
  got = mosaic_gemm.project(h, w2, b2, res, tn=64, stages=2, persistent=True, ctas=1,
                            interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(got)
  assert not ipc.get_races().races_found
  want = res.astype(f32) + jnp.dot(h.astype(f32), w2.astype(jnp.bfloat16).astype(f32),
                                   precision="highest") + b2
  assert _rel(got, want) < BF16_TOL


def test_mbconv_expand_through_the_gemm():
  """MBConv's expand helper with ``gemm=True`` (C=768's default when compiled) gives what
  the single-warpgroup kernel gives on the padded rows."""
  c, e, m = 64, 256, 256
  ks = jax.random.split(jax.random.key(8), 4)
  mask = (jax.random.uniform(ks[0], (m,)) > 0.3).astype(f32)
  x = (rand.normal(ks[1], (m, c)) * mask[:, None]).astype(jnp.bfloat16)

  class P:  # the two fields the helper reads
    fc1_kernel = rand.normal(ks[2], (c, e)) / c ** 0.5
    fc1_bias = rand.normal(ks[3], (e,)) * 0.1

  kw = dict(compiler_params=plgpu.CompilerParams(approx_math=True),
            interpret=mosaic_mlp._interpret_params(True))
  got = mosaic_gconv._mbconv_expand(x, P, mask, None, None, kw, gemm=True)
  one = mosaic_gconv._mbconv_expand(x, P, mask, 64, 0, kw, gemm=False)
  assert _rel(got, one) < 1e-2
  assert _rel(got, _expand_reference(x, None, P.fc1_kernel, P.fc1_bias, "silu", False,
                                     mask)) < BF16_TOL


def test_errors_name_the_problem():
  a = _inputs(1, 128, 64, 128)
  z, w1, b1 = a["z"], a["w1"], a["b1"]
  with pytest.raises(NotImplementedError, match="bfloat16/float16"):
    mosaic_gemm.expand(z.astype(f32), None, w1, b1, interpret=True)
  with pytest.raises(ValueError, match="multiple of 128"):
    mosaic_gemm.expand(z[:100], None, w1, b1, interpret=True)
  with pytest.raises(NotImplementedError, match="contraction"):
    mosaic_gemm.expand(z[:, :48], None, w1[:48], b1, interpret=True)
  with pytest.raises(ValueError, match="stages must be >= 2"):
    mosaic_gemm.expand(z, None, w1, b1, stages=1, interpret=True)
  with pytest.raises(ValueError, match="ctas must be >= 1"):
    mosaic_gemm.expand(z, None, w1, b1, persistent=True, ctas=0, interpret=True)
  with pytest.raises(ValueError, match="tn=96"):
    mosaic_gemm.expand(z, None, w1, b1, tn=96, interpret=True)
  with pytest.raises(ValueError, match="bias_row_mask"):
    mosaic_gemm.expand(z, None, w1, b1, bias_row_mask=jnp.ones((128,)), interpret=True)
  with pytest.raises(ValueError, match="activation"):
    mosaic_gemm.expand(z, None, w1, b1, act="relu", interpret=True)
  with pytest.raises(ValueError, match="res must be"):
    mosaic_gemm.project(jnp.zeros((128, 128), jnp.bfloat16), a["w2"], a["b2"], z[:, :32])
  with pytest.raises(ValueError, match="pick one"):
    mosaic_split.split_mlp(**a, expand_gemm=True, expand_ws_slots=1, interpret=True)


@pytest.mark.parametrize("m,c,e", [(25088, 384, 1536), (6272, 768, 3072)])
def test_default_tiles_lower_for_cuda(m, c, e):
  """The default tiles (192 wide, 4 slots) at ConvNeXt-T's stage-3/4 widths pass Mosaic
  GPU's lowering for CUDA, shared-memory check included (run on a CPU)."""
  assert mosaic_gemm.choose_tiles(e, c) == (192, 4)
  assert mosaic_gemm.choose_tiles(c, e) == (192, 4)
  s = jax.ShapeDtypeStruct
  bf = jnp.bfloat16
  jax.jit(mosaic_gemm.expand).trace(s((m, c), bf), s((c,), f32), s((c, e), f32),
                                    s((e,), f32)).lower(lowering_platforms=("cuda",))
  jax.jit(mosaic_gemm.project).trace(s((m, e), bf), s((e, c), f32), s((c,), f32),
                                     s((m, c), bf), s((m,), f32)).lower(
                                         lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("m,c,e,act,normalize", [(2 * 14 * 14, 384, 1536, "gelu", True),
                                                 (3 * 7 * 7 + 9, 768, 3072, "gelu", True),
                                                 (2 * 81, 768, 3072, "silu", False)])
def test_compiled_gemm_kernels_on_gpu(m, c, e, act, normalize):
  """Both GEMM kernels compiled on a Hopper GPU at the stage-3/4 widths, padded rows."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  a = _inputs(c + 3, m, c, e)
  got = mosaic_split.split_mlp(**a, act=act, normalize=normalize, expand_gemm=True)
  want = mosaic_mlp.fused_mlp_reference(**{k: v.astype(f32) for k, v in a.items()},
                                        act=act, normalize=normalize)
  assert _rel(got, want) < BF16_TOL
  mp = -(-m // 128) * 128
  h = rand.normal(jax.random.key(1), (mp, e)).astype(jnp.bfloat16)
  res = rand.normal(jax.random.key(2), (mp, c)).astype(jnp.bfloat16)
  y = mosaic_gemm.project(h, a["w2"], a["b2"], res)
  want = res.astype(f32) + jnp.dot(h.astype(f32), a["w2"].astype(f32),
                                   precision="highest") + a["b2"]
  assert _rel(y, want) < BF16_TOL
