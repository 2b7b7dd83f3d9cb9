"""Fused ConvNeXt block: Pallas kernels (CPU interpreter) vs the XLA reference.

Poisoning: the Pallas interpreter fills every output buffer with NaN before the kernel
runs (``test_interpreter_poisons_outputs`` checks that premise), so an element a kernel
fails to write shows up as NaN; every comparison below also asserts there is none.
Shapes are tiny (5x7, 9x13) to keep the file fast on CI's CPUs; small tiles force many
tiles per image so the halo exchange between tiles and the cross-tile gradient reductions
are exercised."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import _common as cm
from pallas_kernels import convnext_block, convnext_block_reference
from pallas_kernels.convnext_block import ConvNeXtBlockParams, tuning
from tests import rand

FIELDS = ["x", *ConvNeXtBlockParams._fields, "drop_path_scale"]
# Tiles that split a 9x13 image into several tiles in every kernel (2x8 and 4x4 pixels)
# and the weight-gradient rows into several programs.
SMALL_TILES = tuning.ConvNeXtTiles(
    fwd_pixels=16, fwd_hidden=32, bwd_pixels=16, bwd_hidden=16, wgrad_rows=16,
    wgrad_hidden=32, wgrad_programs=12, dw_pixels=16, dw_channels=16)


def _inputs(seed, shape, dtype, dps=True):
  kx, kp, kg, kd = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = rand.normal(kx, shape, dtype)
  params = tuning.reference_params(kp, c)
  g = rand.normal(kg, shape, dtype)
  d = (jax.random.uniform(kd, (shape[0],)) + 0.5) if dps else None
  return x, params, g, d


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _value_and_grads(fn, x, params, g, dps):
  y, vjp = jax.vjp(fn, x, params, dps)
  return [y, *jax.tree.leaves(vjp(g.astype(y.dtype)))]


def _pallas(tiles=None):
  return lambda x, p, d: convnext_block(x, p, d, implementation="pallas", interpret=True,
                                        tiles=tiles)


def _reference(x, p, d):
  return convnext_block_reference(x, p, d)


def _check(got, want, tol):
  assert len(got) == len(want)
  for name, a, b in zip(FIELDS, got, want):
    assert a.shape == b.shape, name
    # (numpy: an eager jnp check compiles two programs per shape on the CPU)
    assert not np.isnan(np.asarray(a, np.float32)).any(), f"{name}: NaN (unwritten)"
    err = _rel(a, b)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def test_interpreter_poisons_outputs():
  def kernel(x_ref, o_ref):
    o_ref[0] = x_ref[0]
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((4,), jnp.float32),
                       interpret=True)(jnp.ones(4))
  assert bool(jnp.all(jnp.isnan(out[1:])))


@pytest.mark.parametrize("c,shape", [
    (96, (2, 5, 7)), (192, (1, 5, 7)), (384, (1, 5, 7)), (768, (1, 3, 5)),
    (40, (2, 5, 7)), (80, (1, 7, 5)),
])
def test_forward_and_grads_float32(c, shape):
  x, params, g, dps = _inputs(c, (*shape, c), jnp.float32)
  got = _value_and_grads(_pallas(), x, params, g, dps)
  want = _value_and_grads(_reference, x, params, g, dps)
  _check(got, want, 2e-5)


@pytest.mark.parametrize("c,wgrad", [(96, "gemm"), (40, "pallas")])
def test_many_tiles_halo_and_partial_sums_float32(c, wgrad):
  """9x13 image in 2x8 / 4x4 tiles: halos cross tile borders, partial sums span tiles;
  both weight-gradient paths (XLA GEMMs over h/dh, and the Pallas kernel W)."""
  x, params, g, dps = _inputs(7 + c, (2, 9, 13, c), jnp.float32)
  tiles = dataclasses.replace(SMALL_TILES, wgrad=wgrad, fwd_tile_w=4, bwd_tile_w=8)
  got = _value_and_grads(_pallas(tiles), x, params, g, dps)
  want = _value_and_grads(_reference, x, params, g, dps)
  _check(got, want, 2e-5)


def test_grads_match_jax_grad_of_reference():
  """Gradients through jax.grad of a scalar loss (not only vjp with a given cotangent)."""
  x, params, g, dps = _inputs(3, (1, 5, 7, 48), jnp.float32)

  def loss(fn):
    return lambda x, p, d: jnp.sum(jnp.sin(fn(x, p, d)) * g)

  got = jax.grad(loss(_pallas()), argnums=(0, 1, 2))(x, params, dps)
  want = jax.grad(loss(_reference), argnums=(0, 1, 2))(x, params, dps)
  _check(jax.tree.leaves(got), jax.tree.leaves(want), 2e-5)


@pytest.mark.parametrize("c,shape", [(96, (2, 5, 7)), (40, (1, 9, 13))])
def test_bfloat16(c, shape):
  """bfloat16 activations: compared with the reference run in float32 on the same
  (bf16-rounded) inputs; the difference is the kernel's bf16 matmul operands."""
  x, params, g, dps = _inputs(11 + c, (*shape, c), jnp.bfloat16)
  got = _value_and_grads(_pallas(SMALL_TILES if shape[1] > 5 else None), x, params, g, dps)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in got[2:])
  want = _value_and_grads(_reference, x.astype(jnp.float32), params, g.astype(jnp.float32), dps)
  _check(got, want, 2e-2)


def test_auto_modes_follow_the_tile_table(monkeypatch):
  """implementation=None: "hybrid" = Pallas primal, XLA gradients; "xla" = reference;
  inputs under MIN_ROWS_FOR_PALLAS pixels: reference."""
  from pallas_kernels.convnext_block import api
  x, params, g, dps = _inputs(9, (1, 5, 7, 32), jnp.float32)
  hybrid = dataclasses.replace(tuning.heuristic_tiles(32, jnp.float32), auto="hybrid")
  f = lambda x, p, d: convnext_block(x, p, d, interpret=True, tiles=hybrid)
  assert 35 < api.MIN_ROWS_FOR_PALLAS  # tiny input: None keeps XLA
  np.testing.assert_array_equal(np.asarray(f(x, params, dps)),
                                np.asarray(convnext_block_reference(x, params, dps)))
  monkeypatch.setattr(api, "MIN_ROWS_FOR_PALLAS", 0)
  y = f(x, params, dps)
  assert _rel(y, convnext_block_reference(x, params, dps)) > 0  # the kernel ran
  np.testing.assert_array_equal(np.asarray(y), np.asarray(_pallas(hybrid)(x, params, dps)))
  # Differentiated: the XLA block, with the Pallas depthwise conv (forward and input
  # gradient) where the tiles ask for it (mosaic_dwconv, default "pallas").
  assert hybrid.mosaic_dwconv == "pallas"
  got = _value_and_grads(f, x, params, g, dps)
  want = _value_and_grads(
      lambda x, p, d: convnext_block_reference(x, p, d, dw_conv="pallas", interpret=True),
      x, params, g, dps)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check(got, _value_and_grads(_reference, x, params, g, dps), 2e-5)
  hybrid_xla_conv = dataclasses.replace(hybrid, mosaic_dwconv="xla")
  got = _value_and_grads(lambda x, p, d: convnext_block(x, p, d, interpret=True,
                                                        tiles=hybrid_xla_conv),
                         x, params, g, dps)
  want = _value_and_grads(_reference, x, params, g, dps)
  for a, b in zip(got[1:], want[1:]):  # gradients: pure XLA
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  xla = dataclasses.replace(hybrid, auto="xla")
  np.testing.assert_array_equal(
      np.asarray(convnext_block(x, params, dps, interpret=True, tiles=xla)),
      np.asarray(convnext_block_reference(x, params, dps)))


def test_no_drop_path_scale_and_zero_scale():
  x, params, _, _ = _inputs(5, (2, 5, 7, 64), jnp.float32, dps=False)
  y = convnext_block(x, params, implementation="pallas", interpret=True)
  _check([y], [convnext_block_reference(x, params)], 2e-5)
  zero = jnp.array([0.0, 1.0])
  y = convnext_block(x, params, zero, implementation="pallas", interpret=True)
  np.testing.assert_array_equal(np.asarray(y[0]), np.asarray(x[0]))  # branch dropped
  _check([y[1]], [convnext_block_reference(x, params)[1]], 2e-5)


def test_dispatch_and_errors():
  x, params, _, dps = _inputs(1, (1, 5, 7, 64), jnp.float32)
  if jax.default_backend() != "gpu":
    # None falls back to XLA off-GPU; "pallas" names what is unsupported.
    np.testing.assert_array_equal(np.asarray(convnext_block(x, params, dps)),
                                  np.asarray(convnext_block_reference(x, params, dps)))
    with pytest.raises(NotImplementedError, match="GPU backend"):
      convnext_block(x, params, dps, implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    convnext_block(x, params, implementation="triton")
  with pytest.raises(ValueError, match="rank 4"):
    convnext_block(x[0], params, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="fc1_kernel"):
    convnext_block(x, params._replace(fc1_kernel=params.fc1_kernel[:32]), interpret=True)
  with pytest.raises(ValueError, match="drop_path_scale"):
    convnext_block(x, params, jnp.ones((3,)), interpret=True)
  with pytest.raises(ValueError, match="dtype|float32"):
    convnext_block(x.astype(jnp.int32), params, interpret=True)
  with pytest.raises(NotImplementedError, match="even"):
    bad = params._replace(dw_kernel=jnp.zeros((6, 6, 64)))
    convnext_block(x, bad, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="mosaic_dwconv"):
    tiles = dataclasses.replace(tuning.heuristic_tiles(64, x.dtype), mosaic_dwconv="cudnn")
    convnext_block(x, params, implementation="pallas", interpret=True, tiles=tiles)


def test_erf_and_gelu_helpers():
  t = jnp.linspace(-7.0, 7.0, 20001, dtype=jnp.float32)
  assert float(jnp.max(jnp.abs(cm.erf_f32(t) - jax.lax.erf(t)))) < 1e-6
  gelu, dgelu = cm.gelu_exact_and_grad(t)
  np.testing.assert_allclose(gelu, jax.nn.gelu(t, approximate=False), atol=2e-6, rtol=1e-6)
  want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(t)
  np.testing.assert_allclose(dgelu, want, atol=2e-6, rtol=1e-6)


def test_tiling_helpers_cover_the_family():
  for c in (40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536):
    b = cm.channel_blocking(c)
    assert b.block & (b.block - 1) == 0 and b.block >= 16 and b.padded >= c
    assert b.padded == c or c == 40 and b.padded == 48
    chunk, hp = cm.hidden_blocking(4 * c, 64)
    assert hp == 4 * c and chunk & (chunk - 1) == 0
  t = cm.spatial_tiling(5, 7, 128)
  assert (t.tile_h, t.tile_w, t.tiles_h, t.tiles_w) == (8, 8, 1, 1)
  t = cm.spatial_tiling(56, 56, 128)
  assert t.tile_w == 64 and t.pixels == 128 and t.tiles_h * t.tile_h >= 56


def test_tile_table_lookup():
  t = tuning.get_tiles(96, jnp.bfloat16, device_kind="no such device")
  assert t == tuning.heuristic_tiles(96, jnp.bfloat16)
  assert dataclasses.asdict(t) == t.to_json()


def test_tile_table_alias(tmp_path, monkeypatch):
  """An H200 gets the H100 entries (TABLE_ALIASES), not the heuristic; a retuned entry
  cached under the H200's own kind still wins over the aliased table."""
  monkeypatch.setenv("CONVFIRST_JAX_TUNING_CACHE", str(tmp_path / "none.json"))
  for c in (96, 192, 384, 768):  # (the C=768 entry happens to equal the heuristic)
    t = tuning.get_tiles(c, jnp.bfloat16, device_kind="NVIDIA H200")
    assert t == tuning.TUNED[(c, "bfloat16", tuning._H100)], c
    assert c == 768 or t != tuning.heuristic_tiles(c, jnp.bfloat16), c
  assert tuning.get_tiles(96, jnp.float32, "NVIDIA H200") == tuning.heuristic_tiles(
      96, jnp.float32)
  cache = tmp_path / "tiles.json"
  mine = dataclasses.replace(tuning.heuristic_tiles(96, jnp.bfloat16), fwd_pixels=32)
  cache.write_text(json.dumps({"96|bfloat16|NVIDIA H200": mine.to_json()}))
  monkeypatch.setenv("CONVFIRST_JAX_TUNING_CACHE", str(cache))
  assert tuning.get_tiles(96, jnp.bfloat16, device_kind="NVIDIA H200") == mine


@pytest.mark.gpu
def test_compiled_matches_reference_on_gpu():
  x, params, g, dps = _inputs(2, (2, 9, 13, 96), jnp.float32)
  f = lambda x, p, d: convnext_block(x, p, d, implementation="pallas")
  with jax.default_matmul_precision("highest"):
    _check(_value_and_grads(f, x, params, g, dps),
           _value_and_grads(_reference, x, params, g, dps), 2e-5)
