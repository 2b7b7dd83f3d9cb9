"""The Mosaic GPU grouped conv (pallas_kernels.convfirst_block.mosaic_gconv:
3x3, group width 8, + bias + SiLU, on padded flat rows) in the Mosaic GPU interpreter on
CPU, against XLA's grouped conv in float32 on the same bf16 inputs.  The interpreter starts
outputs and shared memory as NaN, so unwritten rows of real pixels show up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_mlp
from pallas_kernels.convfirst_block import ConvFirstBlockParams, MBConvBlockParams
from pallas_kernels.convfirst_block import mosaic_gconv as mg
from pallas_kernels.convfirst_block.reference import (
    convfirst_block_reference,
    mbconv_block_reference,
)

from tests.pallas_kernels.test_mosaic_mlp import BF16_TOL, _rel
from tests import rand


def _inputs(shape, seed=0, dtype=jnp.bfloat16):
  kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
  c = shape[-1]
  x = rand.normal(kx, shape).astype(dtype)
  w = rand.normal(kw, (3, 3, 8, c)) * (72 ** -0.5)
  b = 0.1 * rand.normal(kb, (c,))
  return x, w, b


def test_padded_rows_layout_round_trip():
  """Pixel (n, i, j) sits at row guard + 8 * ((n // 8 * (h+1) + i+1) * (w+1) + j+1) + n % 8,
  every other row is zero, and the real pixels come back out (N not a multiple of 8)."""
  x = jnp.arange(10 * 3 * 5 * 4, dtype=jnp.float32).reshape(10, 3, 5, 4) + 1
  lay = mg.padded_rows(10, 3, 5, 64)
  assert (lay.hp, lay.wp, lay.rows, lay.guard) == (4, 6, 384, 256)
  xr = mg.to_padded_rows(x, lay)
  assert xr.shape == (lay.total, 4)
  for n, i, j in ((1, 2, 4), (9, 0, 0), (8, 2, 3)):
    row = lay.guard + 8 * ((n // 8 * 4 + i + 1) * 6 + j + 1) + n % 8
    np.testing.assert_array_equal(xr[row], x[n, i, j])
  assert int((np.asarray(xr).sum(1) != 0).sum()) == 10 * 3 * 5
  np.testing.assert_array_equal(mg.row_mask(lay), (np.asarray(xr)[:, 0] != 0))
  np.testing.assert_array_equal(mg.from_padded_rows(xr, lay), x)
  with pytest.raises(ValueError, match="does not match the layout"):
    mg.to_padded_rows(x[:9], lay)


def test_every_tap_of_a_pixel_stays_in_its_image():
  """The property the kernel relies on: for each real pixel and each 3x3 tap, the row at
  8 (dy wp + dx) from it holds the tap's neighbour of the same image, or a zero row where
  the neighbour is outside the image -- never another image's pixel or a guard row."""
  n, h, w = 11, 3, 4
  x = jnp.arange(1, n * h * w + 1, dtype=jnp.float32).reshape(n, h, w, 1)
  lay = mg.padded_rows(n, h, w)
  xr = np.asarray(mg.to_padded_rows(x, lay))[:, 0]
  for b in range(n):
    for i in range(h):
      for j in range(w):
        row = lay.guard + 8 * ((b // 8 * lay.hp + i + 1) * lay.wp + j + 1) + b % 8
        assert xr[row] == x[b, i, j, 0]
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            inside = 0 <= i + dy < h and 0 <= j + dx < w
            want = x[b, i + dy, j + dx, 0] if inside else 0
            got = xr[row + 8 * (dy * lay.wp + dx)]
            assert lay.guard <= row + 8 * (dy * lay.wp + dx) < lay.total - lay.guard // 2
            assert got == want, (b, i, j, dy, dx)


@pytest.mark.parametrize("shape,kw", [
    ((2, 5, 7, 32), {}),                                  # odd H and W, one chunk
    ((1, 6, 6, 96), dict(block_m=128)),                   # batch 1, 3 chunks, 128-row CTAs
    ((9, 4, 3, 32), dict(block_m=64)),                    # two image groups, 64-row CTAs
    ((2, 3, 14, 128), dict(chunk=64)),                    # 64-channel chunks, W + 2 = 16
    ((1, 1, 1, 64), {}),                                  # a single pixel
    ((2, 5, 7, 64), dict(per_cta=2, block_m=64)),         # pipelined: 2 chunks per CTA
    ((9, 4, 3, 128), dict(per_cta=4, block_m=128, stages=3)),  # all 4 chunks, 3 stages
    ((1, 6, 6, 96), dict(per_cta=3, stages=1)),           # pipeline depth 1
])
def test_grouped_conv_act_matches_xla(shape, kw):
  x, w, b = _inputs(shape, seed=sum(shape))
  got = mg.grouped_conv_act(x, w, b, interpret=True, **kw)
  want = mg.grouped_conv_act_reference(x.astype(jnp.float32), w, b)
  assert got.shape == x.shape and got.dtype == x.dtype
  assert _rel(got, want) < BF16_TOL


def test_identity_activation_and_float16():
  x, w, b = _inputs((1, 4, 5, 32), seed=3, dtype=jnp.float16)
  got = mg.grouped_conv_act(x, w, b, act="identity", interpret=True)
  want = mg.grouped_conv_act_reference(x.astype(jnp.float32), w, b, act="identity")
  assert _rel(got, want) < BF16_TOL


@pytest.mark.parametrize("kw", [{}, dict(per_cta=2, block_m=64)])
def test_no_races(kw):
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  x, w, b = _inputs((1, 3, 4, 64), seed=5)
  ipc.reset_gpu_interpret_mode_state()
  got = mg.grouped_conv_act(x, w, b, interpret=plgpu.InterpretGPUParams(detect_races=True),
                            **kw)
  jax.block_until_ready(got)
  assert not ipc.get_races().races_found
  assert _rel(got, mg.grouped_conv_act_reference(x.astype(jnp.float32), w, b)) < BF16_TOL


def test_errors_name_the_problem():
  x, w, b = _inputs((1, 4, 4, 32))
  with pytest.raises(NotImplementedError, match="bfloat16/float16"):
    mg.grouped_conv_act(x.astype(jnp.float32), w, b, interpret=True)
  with pytest.raises(NotImplementedError, match="3x3 group-width-8"):
    mg.grouped_conv_act(x, jnp.zeros((5, 5, 8, 32)), b, interpret=True)
  with pytest.raises(NotImplementedError, match="multiple of the channel chunk"):
    mg.grouped_conv_act(x, w, b, chunk=64, interpret=True)
  with pytest.raises(ValueError, match="bias"):
    mg.grouped_conv_act(x, w, b[:8], interpret=True)
  with pytest.raises(ValueError, match="act"):
    mg.grouped_conv_act(x, w, b, act="gelu", interpret=True)
  with pytest.raises(ValueError, match="per_cta=3 must divide the 1 channel chunks"):
    mg.grouped_conv_act(x, w, b, per_cta=3, interpret=True)


def _mbconv(c, e, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  return MBConvBlockParams(
      fc1_kernel=rand.normal(ks[0], (c, e)) * c ** -0.5,
      fc1_bias=0.5 * rand.normal(ks[1], (e,)),
      conv_kernel=rand.normal(ks[2], (3, 3, 8, e)) * 72 ** -0.5,
      conv_bias=0.1 * rand.normal(ks[3], (e,)),
      fc2_kernel=rand.normal(ks[4], (e, c)) * e ** -0.5,
      fc2_bias=0.1 * rand.normal(ks[5], (c,)))


@pytest.mark.parametrize("shape,e", [((2, 5, 7, 64), 256),    # odd H, W; one image group
                                     ((9, 3, 4, 128), 256),   # two groups, a partial one
                                     ((1, 1, 1, 64), 128)])   # one pixel: every tap but one
def test_mbconv_forward_matches_reference(shape, e):          # reads the zero border
  """The three-kernel MBConv block (expand with the row-masked bias, grouped conv, project
  with the row mask as row scale) vs the float32 reference; a nonzero fc1 bias makes the
  border rows' h nonzero unless the mask works."""
  x = rand.normal(jax.random.key(shape[0]), shape).astype(jnp.bfloat16)
  p = _mbconv(shape[-1], e, seed=sum(shape))
  got = mg.mbconv_forward(x, p, interpret=True)
  want = mbconv_block_reference(x.astype(jnp.float32), p)
  assert got.shape == x.shape and got.dtype == x.dtype
  assert _rel(got, want) < BF16_TOL


def test_mbconv_project_kernel_choice(monkeypatch):
  """MBConv blocks project through mosaic_gemm's GEMM by default when compiled
  (``PROJECT_GEMM``), through the split project kernel with it off or in the interpreter."""
  from pallas_kernels import mosaic_gemm, mosaic_split
  seen = []
  for mod, name in ((mosaic_gemm, "project"), (mosaic_split, "project_call")):
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **k:
                        seen.append(name) or real(*a, **k))
  lay = mg.padded_rows(16, 7, 7)
  xr = jax.ShapeDtypeStruct((lay.total, 384), jnp.bfloat16)
  p = jax.tree.map(jnp.zeros_like, _mbconv(384, 1536))
  for on, want in ((True, "project"), (False, "project_call")):
    monkeypatch.setattr(mg, "PROJECT_GEMM", on)
    jax.eval_shape(lambda xr: mg.mbconv_rows(xr, p, lay, mg.row_mask(lay)), xr)
    assert seen.pop() == want
  monkeypatch.setattr(mg, "PROJECT_GEMM", True)
  x = rand.normal(jax.random.key(2), (2, 3, 3, 64)).astype(jnp.bfloat16)
  mg.mbconv_forward(x, _mbconv(64, 128, seed=3), interpret=True)
  assert seen.pop() == "project_call"


def test_mbconv_forward_through_the_gemm_kernels():
  """Both mosaic_gemm kernels in the MBConv block (expand with the row-masked bias, project
  with the row mask as row scale and select_zero_rows), odd H and W."""
  x = rand.normal(jax.random.key(3), (3, 5, 3, 64)).astype(jnp.bfloat16)
  p = _mbconv(64, 256, seed=4)
  got = mg.mbconv_stage_forward(x, (p,), expand_gemm=True, project_gemm=True,
                                interpret=True)
  assert _rel(got, mbconv_block_reference(x.astype(jnp.float32), p)) < BF16_TOL


def test_mbconv_rows_keep_the_border_zero():
  """mbconv_rows returns exact zeros off the real pixels, so blocks can chain in the layout;
  two chained blocks match two reference blocks."""
  x = rand.normal(jax.random.key(7), (2, 4, 5, 64)).astype(jnp.bfloat16)
  p, q = _mbconv(64, 128, seed=1), _mbconv(64, 128, seed=2)
  lay = mg.padded_rows(2, 4, 5)
  mask = mg.row_mask(lay)
  y = mg.mbconv_rows(mg.to_padded_rows(x, lay), p, lay, mask, interpret=True)
  assert y.shape == (lay.total, 64)
  assert not np.asarray(y.astype(jnp.float32)[np.asarray(mask) == 0]).any()
  y = mg.mbconv_rows(y, q, lay, mask, interpret=True)
  got = mg.from_padded_rows(y, lay)
  want = mbconv_block_reference(mbconv_block_reference(x.astype(jnp.float32), p), q)
  assert _rel(got, want) < BF16_TOL


def test_mbconv_expand_kernel_choice(monkeypatch):
  """The expand kernel MBConv blocks run: mosaic_gemm's GEMM by default when compiled
  (``EXPAND_GEMM``); with it off, the warp-specialised one where it fits shared memory
  (convfirst_t's C=384, and C=64), else the single-warpgroup one (C=768); the
  single-warpgroup one in the interpreter, or when ``expand_block_m`` /
  ``expand_ws_slots=0`` ask for it; all give the reference's block."""
  from pallas_kernels import mosaic_gemm, mosaic_split
  seen = []
  real = mosaic_split.expand_call
  monkeypatch.setattr(mosaic_split, "expand_call",
                      lambda *a, **k: seen.append(k.get("ws_slots", 0)) or real(*a, **k))
  real_gemm = mosaic_gemm.expand
  monkeypatch.setattr(mosaic_gemm, "expand",
                      lambda *a, **k: seen.append("gemm") or real_gemm(*a, **k))
  for c, slots, gemm in ((384, "gemm", True), (768, "gemm", True), (64, "gemm", True),
                         (384, mg.EXPAND_WS_SLOTS, False), (768, 0, False),
                         (64, mg.EXPAND_WS_SLOTS, False)):
    monkeypatch.setattr(mg, "EXPAND_GEMM", gemm)
    lay = mg.padded_rows(16, 7, 7)
    xr = jax.ShapeDtypeStruct((lay.total, c), jnp.bfloat16)
    p = jax.tree.map(jnp.zeros_like, _mbconv(c, 4 * c))
    jax.eval_shape(lambda xr: mg.mbconv_rows(xr, p, lay, mg.row_mask(lay)), xr)
    assert seen.pop() == slots
  monkeypatch.setattr(mg, "EXPAND_GEMM", True)
  assert mg.EXPAND_WS_SLOTS == 1
  x = rand.normal(jax.random.key(5), (3, 3, 5, 64)).astype(jnp.bfloat16)
  p = _mbconv(64, 256, seed=9)
  want = mbconv_block_reference(x.astype(jnp.float32), p)
  for kw, slots in ((dict(expand_ws_slots=0), 0), (dict(expand_block_m=128), 0),
                    (dict(expand_ws_slots=2), 2), ({}, 0)):
    got = mg.mbconv_stage_forward(x, (p,), interpret=True, **kw)
    assert seen.pop() == slots
    assert _rel(got, want) < BF16_TOL
  with pytest.raises(ValueError, match="expand_ws_slots=1 does not fit"):
    lay = mg.padded_rows(8, 7, 7)
    p768 = jax.tree.map(jnp.zeros_like, _mbconv(768, 3072))
    jax.eval_shape(lambda xr: mg.mbconv_rows(
        xr, p768, lay, mg.row_mask(lay),
        expand_ws_slots=1), jax.ShapeDtypeStruct((lay.total, 768), jnp.bfloat16))


def test_mbconv_forward_errors():
  x = jnp.zeros((1, 4, 4, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="multiple of 64"):
    mg.mbconv_forward(jnp.zeros((1, 4, 4, 32), jnp.bfloat16), _mbconv(32, 128), interpret=True)
  with pytest.raises(NotImplementedError, match="bfloat16/float16"):
    mg.mbconv_forward(x.astype(jnp.float32), _mbconv(64, 128), interpret=True)
  with pytest.raises(ValueError, match="conv_kernel"):
    mg.mbconv_forward(x, _mbconv(64, 128)._replace(conv_kernel=jnp.zeros((3, 3, 8, 64))),
                      interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 14, 14, 1536), (3, 7, 7, 3072), (1, 9, 11, 64)])
def test_compiled_grouped_conv_on_gpu(shape):
  """The compiled kernel at MBConv's hidden widths (convfirst_t stages 3-4,
  E=4) and an odd small case."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  x, w, b = _inputs(shape, seed=shape[-1])
  got = mg.grouped_conv_act(x, w, b)
  want = mg.grouped_conv_act_reference(x.astype(jnp.float32), w, b)
  assert _rel(got, want) < BF16_TOL


@pytest.mark.parametrize("shape,kw", [((128, 14, 14, 1536), {}),
                                      ((128, 14, 14, 1536), dict(block_m=64)),
                                      ((64, 7, 7, 3072), dict(block_m=128, chunk=64)),
                                      ((128, 14, 14, 1536), dict(block_m=128, per_cta=8)),
                                      ((128, 14, 14, 1536), dict(per_cta=4, stages=3))])
def test_kernel_lowers_for_cuda(shape, kw):
  """Mosaic GPU's own lowering (layout inference, TMA and wgmma constraints) runs on a CPU:
  it rejected the first design's TMA copies at row starts that were not multiples of 8."""
  lay = mg.padded_rows(*shape[:3])
  xr = jax.ShapeDtypeStruct((lay.total, shape[-1]), jnp.bfloat16)
  w, b = jnp.zeros((3, 3, 8, shape[-1])), jnp.zeros((shape[-1],))
  jax.jit(lambda xr: mg.grouped_conv_rows(xr, w, b, lay, **kw)).trace(xr).lower(
      lowering_platforms=("cuda",))


@pytest.mark.parametrize("shape", [(128, 14, 14, 384), (128, 7, 7, 768)])
def test_mbconv_kernels_lower_for_cuda(shape):
  """convfirst_t's MBConv stages (E=4): all three kernels through Mosaic GPU's lowering."""
  n, h, w, c = shape
  lay = mg.padded_rows(n, h, w)
  xr = jax.ShapeDtypeStruct((lay.total, c), jnp.bfloat16)
  p = jax.tree.map(jnp.zeros_like, _mbconv(c, 4 * c))
  jax.jit(lambda xr: mg.mbconv_rows(xr, p, lay, mg.row_mask(lay))).trace(xr).lower(
      lowering_platforms=("cuda",))


def test_mbconv_block_forward_kernel_mosaic():
  """The public entry point runs the Mosaic form only when asked for by name."""
  from pallas_kernels.convfirst_block import mbconv_block
  x = rand.normal(jax.random.key(3), (2, 3, 5, 64)).astype(jnp.bfloat16)
  p = _mbconv(64, 128, seed=4)
  got = mbconv_block(x, p, implementation="pallas", interpret=True, forward_kernel="mosaic")
  assert _rel(got, mbconv_block_reference(x.astype(jnp.float32), p)) < BF16_TOL
  with pytest.raises(ValueError, match="forward_kernel"):
    mbconv_block(x, p, implementation="pallas", interpret=True, forward_kernel="cuda")
  with pytest.raises(NotImplementedError, match="3x3"):
    p5 = p._replace(conv_kernel=jnp.zeros((5, 5, 8, 128)))
    mbconv_block(x, p5, implementation="pallas", interpret=True, forward_kernel="mosaic")
  # "pallas" without forward_kernel: the Mosaic form where it runs, else Pallas-Triton.
  from pallas_kernels.convfirst_block import api
  assert api.mbconv_forward_kernel(x, p, True) == "mosaic"
  assert api.mbconv_forward_kernel(x, p, True, "triton") == "triton"
  assert api.mbconv_forward_kernel(x.astype(jnp.float32), p, True) == "triton"
  assert api.mbconv_forward_kernel(x, p5, True) == "triton"
  np.testing.assert_array_equal(
      mbconv_block(x, p, implementation="pallas", interpret=True), got)


def test_mbconv_stage_chains_blocks_in_the_layout():
  """mbconv_stage with implementation="pallas": three blocks in the Mosaic form (one layout
  pass in, one out) match three reference blocks; "xla" is the reference chain."""
  from pallas_kernels.convfirst_block import api
  x = rand.normal(jax.random.key(11), (3, 5, 3, 64)).astype(jnp.bfloat16)
  ps = [_mbconv(64, 128, seed=s) for s in (5, 6, 7)]
  assert api.mbconv_stage_kernel(x, ps, implementation="pallas", interpret=True) == "mosaic"
  got = api.mbconv_stage(x, ps, implementation="pallas", interpret=True)
  want = x.astype(jnp.float32)
  for p in ps:
    want = mbconv_block_reference(want, p)
  assert got.shape == x.shape and got.dtype == x.dtype
  assert _rel(got, want) < BF16_TOL
  xla = x
  for p in ps:
    xla = mbconv_block_reference(xla, p)
  np.testing.assert_array_equal(api.mbconv_stage(x, ps, implementation="xla"), xla)
  assert api.mbconv_stage(x, [], implementation="pallas", interpret=True) is x


def test_a_nan_image_stays_in_its_image():
  """A NaN pixel in image 0 makes image 0 NaN and nothing else, over three chained blocks
  (image 8 shares image 0's border rows' neighbourhood in the layout)."""
  x = rand.normal(jax.random.key(12), (9, 3, 3, 64)).astype(jnp.bfloat16)
  x[0, 1, 1, 5] = np.nan
  ps = [_mbconv(64, 128, seed=s) for s in (1, 2, 3)]
  got = np.asarray(mg.mbconv_stage_forward(x, tuple(ps), interpret=True).astype(jnp.float32))
  want = x.astype(jnp.float32)
  for p in ps:
    want = mbconv_block_reference(want, p)
  assert np.isnan(got[0]).any()
  assert np.isfinite(got[1:]).all()
  assert _rel(got[1:], want[1:]) < BF16_TOL


def test_mbconv_stage_kernel_choice():
  """None takes the Mosaic form where its layout costs few rows per pixel (convfirst_t's
  14x14 stage at batch 16+, its 7x7 stage at batch 128+) and the batch is at least
  MIN_STAGE_BATCH_FOR_PALLAS, not at small batches; unsupported calls run block by block;
  bad arguments name the problem."""
  from pallas_kernels.convfirst_block import api
  s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  p384, p768 = _mbconv(384, 1536), _mbconv(768, 3072)
  kind = lambda x, p, **kw: api.mbconv_stage_kernel(x, [p], interpret=True, **kw)
  assert mg.row_overhead(128, 14, 14) < api.MOSAIC_STAGE_MAX_ROW_OVERHEAD
  assert kind(s(128, 14, 14, 384), p384) == "mosaic"
  assert kind(s(256, 14, 14, 384), p384) == "mosaic"
  assert kind(s(128, 7, 7, 768), p768) == "mosaic"
  assert kind(s(256, 7, 7, 768), p768) == "mosaic"
  assert kind(s(64, 7, 7, 768), p768) == "blocks"
  assert kind(s(64, 7, 7, 768), p768, implementation="pallas") == "mosaic"
  assert kind(s(4, 14, 14, 384), p384) == "blocks"
  assert api.MIN_STAGE_BATCH_FOR_PALLAS == 16
  assert kind(s(16, 14, 14, 384), p384) == "mosaic"
  assert mg.row_overhead(8, 28, 28) < api.MOSAIC_STAGE_MAX_ROW_OVERHEAD
  assert kind(s(8, 28, 28, 384), p384) == "blocks"     # few rows per pixel, but batch < 16
  assert kind(s(8, 28, 28, 384), p384, implementation="pallas") == "mosaic"
  assert kind(s(128, 14, 14, 384, dt=jnp.float32), p384, implementation="pallas") == "blocks"
  assert kind(s(128, 14, 14, 384), p384, implementation="xla") == "blocks"
  p5 = p384._replace(conv_kernel=jnp.zeros((5, 5, 8, 1536)))
  assert kind(s(128, 14, 14, 384), p5, implementation="pallas") == "blocks"
  assert api.mbconv_stage_kernel(s(128, 14, 14, 384), [p384]) == "blocks"  # CPU, compiled
  with pytest.raises(ValueError, match="implementation must be one of"):
    kind(s(128, 14, 14, 384), p384, implementation="mosaic")
  with pytest.raises(ValueError, match="fc2_kernel"):
    api.mbconv_stage(jnp.zeros((1, 4, 4, 64), jnp.bfloat16),
                     [_mbconv(64, 128)._replace(fc2_kernel=jnp.zeros((128, 32)))])


@pytest.mark.gpu
def test_compiled_mbconv_stage_on_gpu():
  """The chain at convfirst_t's stage-3 width (three blocks, 14x14x384, E=4, batch 16)."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  from pallas_kernels.convfirst_block import api
  x = rand.normal(jax.random.key(1), (16, 14, 14, 384)).astype(jnp.bfloat16)
  ps = [_mbconv(384, 1536, seed=s) for s in range(3)]
  got = api.mbconv_stage(x, ps, implementation="pallas")
  want = x.astype(jnp.float32)
  for p in ps:
    want = mbconv_block_reference(want, p)
  assert _rel(got, want) < BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 14, 14, 384), (3, 7, 7, 768)])
def test_compiled_mbconv_on_gpu(shape):
  """The three compiled kernels at convfirst_t's MBConv widths (E=4)."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  x = rand.normal(jax.random.key(shape[-1]), shape).astype(jnp.bfloat16)
  p = _mbconv(shape[-1], 4 * shape[-1], seed=shape[0])
  got = mg.mbconv_forward(x, p)
  assert _rel(got, mbconv_block_reference(x.astype(jnp.float32), p)) < BF16_TOL


# ------------------------------------------------------------- ConvFirst blocks in the layout


def _convfirst(c, e, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  return ConvFirstBlockParams(
      conv_kernel=rand.normal(ks[0], (3, 3, 8, c)) * 72 ** -0.5,
      conv_bias=0.5 * rand.normal(ks[1], (c,)),
      fc1_kernel=rand.normal(ks[2], (c, e)) * c ** -0.5,
      fc1_bias=0.5 * rand.normal(ks[3], (e,)),
      fc2_kernel=rand.normal(ks[4], (e, c)) * e ** -0.5,
      fc2_bias=0.1 * rand.normal(ks[5], (c,)))


def _chain(ref, x, ps):
  for p in ps:
    x = ref(x, p)
  return x


@pytest.mark.parametrize("shape,e,n_blocks", [((2, 5, 7, 64), 256, 1),   # odd H, W; one group
                                              ((9, 3, 4, 96), 384, 1),   # two groups, partial
                                              ((1, 1, 1, 32), 128, 1)])  # one pixel
def test_convfirst_stage_matches_reference(shape, e, n_blocks):
  """The ConvFirst stage in the padded-row layout (grouped conv kernel + fused MLP kernel
  with the row mask) vs float32 reference blocks; the nonzero conv and fc biases would make
  the border rows nonzero, and reach the next block's conv, unless the mask works (chains
  of two and three blocks: test_convfirst_stage_api_and_kernel_choice and the NaN test)."""
  x = rand.normal(jax.random.key(shape[0]), shape).astype(jnp.bfloat16)
  ps = tuple(_convfirst(shape[-1], e, seed=sum(shape) + i) for i in range(n_blocks))
  got = mg.convfirst_stage_forward(x, ps, interpret=True)
  assert got.shape == x.shape and got.dtype == x.dtype
  assert _rel(got, _chain(convfirst_block_reference, x.astype(jnp.float32), ps)) < BF16_TOL


def test_convfirst_rows_keep_the_border_zero_with_two_warpgroups():
  """convfirst_rows returns exact zeros off the real pixels with the 128-row (two compute
  warpgroups) MLP kernel too -- the default at 128 < C <= 256."""
  x = rand.normal(jax.random.key(8), (3, 4, 3, 160)).astype(jnp.bfloat16)
  p = _convfirst(160, 128, seed=3)
  assert mg.default_mlp_block_m(160, 640) == 128 and mg.default_mlp_block_m(96, 384) == 64
  lay = mg.padded_rows(3, 4, 3)
  mask = mg.row_mask(lay)
  y = mg.convfirst_rows(mg.to_padded_rows(x, lay), p, lay, mask, mlp_block_m=128,
                        interpret=True)
  assert y.shape == (lay.total, 160)
  assert not np.asarray(y.astype(jnp.float32)[np.asarray(mask) == 0]).any()
  want = convfirst_block_reference(x.astype(jnp.float32), p)
  assert _rel(mg.from_padded_rows(y, lay), want) < BF16_TOL


def test_a_nan_image_stays_in_its_image_convfirst():
  """A NaN pixel in image 0 of a three-block ConvFirst stage: image 0 goes NaN, no other
  image does (the MLP kernel selects exact zeros at the border rows whatever the conv left
  there; multiplying by the row mask instead lets the NaN reach image 8 at the third
  block, through the border row the two images' groups share)."""
  x = rand.normal(jax.random.key(13), (9, 3, 3, 32)).astype(jnp.bfloat16)
  x[0, 1, 1, 5] = np.nan
  ps = tuple(_convfirst(32, 128, seed=s) for s in (1, 2, 3))
  got = np.asarray(mg.convfirst_stage_forward(x, ps, interpret=True).astype(jnp.float32))
  assert np.isnan(got[0]).any()
  assert np.isfinite(got[1:]).all()
  want = _chain(convfirst_block_reference, x.astype(jnp.float32), ps)
  assert _rel(got[1:], want[1:]) < BF16_TOL


def test_convfirst_stage_api_and_kernel_choice(monkeypatch):
  """convfirst_stage: "pallas" runs the layout form and matches the reference chain, "xla"
  is the reference chain; None takes the layout form at large inputs with few rows per
  pixel and C <= 128, and runs every block in XLA below MIN_STAGE_BATCH_FOR_PALLAS images;
  unsupported calls go block by block; bad arguments name the problem."""
  from pallas_kernels.convfirst_block import api
  x = rand.normal(jax.random.key(21), (2, 3, 5, 32)).astype(jnp.bfloat16)
  ps = [_convfirst(32, 128, seed=s) for s in (4, 5)]
  got = api.convfirst_stage(x, ps, implementation="pallas", interpret=True)
  assert _rel(got, _chain(convfirst_block_reference, x.astype(jnp.float32), ps)) < BF16_TOL
  np.testing.assert_array_equal(api.convfirst_stage(x, ps, implementation="xla"),
                                _chain(convfirst_block_reference, x, ps))
  assert api.convfirst_stage(x, [], implementation="pallas", interpret=True) is x

  s = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  p96, p192 = _convfirst(96, 384), _convfirst(192, 768)
  kind = lambda x, p, **kw: api.convfirst_stage_kernel(x, [p], interpret=True, **kw)
  assert kind(s(128, 56, 56, 96), p96) == "mosaic"
  assert kind(s(256, 56, 56, 96), p96) == "mosaic"
  assert kind(s(256, 28, 28, 192), p192) == "blocks"    # C > 128: measured slower
  assert kind(s(256, 28, 28, 192), p192, implementation="pallas") == "mosaic"
  assert kind(s(1, 56, 56, 96), p96) == "blocks"        # 8 image slots for one image
  assert kind(s(1, 56, 56, 96), p96, implementation="pallas") == "mosaic"
  assert kind(s(8, 56, 56, 96), p96) == "blocks"        # few rows per pixel, but batch < 16
  assert kind(s(16, 56, 56, 96), p96) == "mosaic"
  assert kind(s(8, 56, 56, 96), p96, implementation="pallas") == "mosaic"
  form = lambda x, p, kind="convfirst", **kw: api.stage_form(kind, x, [p], interpret=True, **kw)
  assert form(s(8, 56, 56, 96), p96) == "xla"
  assert form(s(16, 56, 56, 96), p96) == "stage"
  assert form(s(16, 28, 28, 192), p192) == "blocks"
  assert form(s(8, 56, 56, 96), p96, implementation="pallas") == "stage"
  assert form(s(8, 28, 28, 192, dt=jnp.float32), p192, implementation="pallas") == "blocks"
  assert form(s(16, 56, 56, 96), p96, implementation="xla") == "xla"
  p768 = _mbconv(768, 3072)
  assert form(s(16, 7, 7, 768), p768, "mbconv") == "xla"   # 784 pixels: no block kernel
  assert form(s(128, 7, 7, 768), p768, "mbconv") == "stage"
  with pytest.raises(ValueError, match="kind must be"):
    form(s(16, 56, 56, 96), p96, "convnext")
  # Block by block, None passes "xla" to every block below MIN_STAGE_BATCH_FOR_PALLAS (even
  # where the block alone would pick its kernel), and None from there on.
  monkeypatch.setattr(api, "MIN_ROWS_FOR_PALLAS", 0)
  asked = []
  monkeypatch.setattr(api, "convfirst_block",
                      lambda x, p, implementation, interpret: asked.append(implementation) or x)
  api.convfirst_stage(x, ps, interpret=True)
  assert asked == ["xla", "xla"]
  monkeypatch.setattr(api, "MIN_STAGE_BATCH_FOR_PALLAS", 2)
  api.convfirst_stage(x, ps, interpret=True)
  assert asked == ["xla", "xla", None, None]
  assert kind(s(128, 56, 56, 96), p96, implementation="xla") == "blocks"
  assert kind(s(128, 56, 56, 96, dt=jnp.float32), p96, implementation="pallas") == "blocks"
  p5 = p96._replace(conv_kernel=jnp.zeros((5, 5, 8, 96)))
  assert kind(s(128, 56, 56, 96), p5, implementation="pallas") == "blocks"
  assert kind(s(128, 56, 56, 40), _convfirst(40, 160)) == "blocks"   # C % 32 != 0
  assert api.convfirst_stage_kernel(s(128, 56, 56, 96), [p96]) == "blocks"  # CPU, compiled
  with pytest.raises(ValueError, match="implementation must be one of"):
    kind(s(128, 56, 56, 96), p96, implementation="mosaic")
  with pytest.raises(ValueError, match="fc2_kernel"):
    api.convfirst_stage(jnp.zeros((1, 4, 4, 32), jnp.bfloat16),
                        [_convfirst(32, 128)._replace(fc2_kernel=jnp.zeros((128, 64)))])
  with pytest.raises(NotImplementedError, match="3x3"):
    mg.convfirst_stage_forward(x, (ps[0]._replace(conv_kernel=jnp.zeros((5, 5, 8, 32))),),
                               interpret=True)


@pytest.mark.parametrize("shape", [(128, 56, 56, 96), (128, 28, 28, 192)])
def test_convfirst_kernels_lower_for_cuda(shape):
  """convfirst_t's ConvFirst stages (E=4): both kernels through Mosaic GPU's lowering
  (shared memory, TMA tiling) with the default tiles."""
  n, h, w, c = shape
  lay = mg.padded_rows(n, h, w)
  xr = jax.ShapeDtypeStruct((lay.total, c), jnp.bfloat16)
  p = jax.tree.map(jnp.zeros_like, _convfirst(c, 4 * c))
  jax.jit(lambda xr: mg.convfirst_rows(xr, p, lay, mg.row_mask(lay))).trace(xr).lower(
      lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 56, 56, 96), (16, 28, 28, 192), (3, 9, 11, 64)])
def test_compiled_convfirst_stage_on_gpu(shape):
  """The compiled chain (three blocks, E=4) at convfirst_t's ConvFirst widths and an odd
  small case."""
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  from pallas_kernels.convfirst_block import api
  x = rand.normal(jax.random.key(2), shape).astype(jnp.bfloat16)
  ps = [_convfirst(shape[-1], 4 * shape[-1], seed=s) for s in range(3)]
  got = api.convfirst_stage(x, ps, implementation="pallas")
  assert _rel(got, _chain(convfirst_block_reference, x.astype(jnp.float32), ps)) < BF16_TOL
