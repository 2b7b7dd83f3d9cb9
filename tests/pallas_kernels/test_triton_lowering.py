"""Every Pallas kernel lowers to Triton for an H100, checked on a CPU-only machine.

Interpret mode runs a kernel's arithmetic but not the Triton lowering, which has its own
restrictions (it rejected the MBConv kernel's loop-tap arithmetic on the H100 with
"AssertionError: ('i32', 'i1')" and a ".cg" cache modifier with a KeyError; both were only
seen on the GPU).  Lowering a jitted call for the "cuda" platform runs that lowering here.
Pallas asks the driver for the compute capability; with no GPU we give it the H100's
(9.0) by patching that one query, a private jax API, hence the guard.  Compiling the
Triton module (register and shared-memory limits) still needs a GPU.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import pytest

try:
  from jax._src.pallas.triton import pallas_call_registration as _registration
except ImportError:  # pragma: no cover - private module moved
  _registration = None

from pallas_kernels.convfirst_block import ConvFirstBlockParams, MBConvBlockParams
from pallas_kernels.convfirst_block import grouped_conv_triton as gc_triton
from pallas_kernels.convfirst_block import pallas_triton as cf_triton
from pallas_kernels.convnext_block import pallas_triton as cn_triton
from pallas_kernels.convnext_block.tuning import heuristic_tiles, reference_params

pytestmark = pytest.mark.skipif(
    _registration is None or not hasattr(_registration, "gpu_info_lib"),
    reason="jax's private Triton registration module changed")


@pytest.fixture(autouse=True)
def h100_compute_capability(monkeypatch):
  if jax.default_backend() != "gpu":
    monkeypatch.setattr(_registration.gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability=90))


def _lower_for_cuda(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _abstract(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("shape", [(2, 9, 13, 96), (2, 7, 7, 40)])
def test_depthwise_conv_kernels_lower(shape):
  """The depthwise conv (forward / input gradient) and its kernel-gradient kernel, a full
  and a partial channel block."""
  from pallas_kernels.convnext_block import dwconv_triton
  x = _abstract(shape)
  kernel = jnp.ones((7, 7, shape[-1]), jnp.float32)
  _lower_for_cuda(lambda x: dwconv_triton.depthwise_conv(x, kernel), x)
  cols = dwconv_triton.DwconvTiles(columns=True)
  _lower_for_cuda(lambda x, r: dwconv_triton.depthwise_conv(x, kernel, None, r, tiles=cols,
                                                            col_sums=True), x, x)
  _lower_for_cuda(lambda x, g: dwconv_triton.depthwise_conv_wgrad(x, g, 7), x, x)
  for one_pass in (dwconv_triton.WgradTiles(one_pass=True),
                   dwconv_triton.WgradTiles(one_pass=True, images=3),  # 2 = 0 + 2 images
                   dwconv_triton.WgradTiles(columns=True),
                   dwconv_triton.WgradTiles(columns=True, strip=4, rows=8, unroll=7)):
    _lower_for_cuda(lambda x, g, t=one_pass: dwconv_triton.depthwise_conv_wgrad(x, g, 7, tiles=t),
                    x, x)


@pytest.mark.parametrize("m,c", [(999, 40), (4096, 1536)])
def test_batchnorm_kernels_lower(m, c):
  """BatchNorm's statistics and backward-sums kernels (the latter with and without the
  inline-PTX sigmoid), a partial row tile and column block, and a wide C."""
  from pallas_kernels import batchnorm as bn
  z, v = _abstract((m, c)), jnp.ones((c,), jnp.float32)
  _lower_for_cuda(lambda z: bn.column_sums(z), z)
  for tiles in (bn.Tiles(), bn.Tiles(fast_sigmoid=False)):
    for act in (None, "silu"):
      _lower_for_cuda(lambda z, du, t=tiles, a=act: bn._bwd_sums(z, du, v, v, v, v, a, 1,
                                                                   False, t), z, z)


@pytest.mark.parametrize("c", [96, 768])
def test_convnext_forward_and_backward_lower(c):
  params = reference_params(jax.random.key(0), c)
  x = _abstract((2, 9, 13, c))
  dps = jnp.ones((2,), jnp.float32)
  tiles = heuristic_tiles(c, jnp.bfloat16)
  _lower_for_cuda(lambda x: cn_triton.forward(x, params, dps, eps=1e-6, tiles=tiles,
                                              interpret=False), x)
  _lower_for_cuda(lambda x, g: cn_triton.backward(x, params, dps, g, eps=1e-6, tiles=tiles,
                                                  interpret=False), x, x)


def _convfirst_params(c, e, k):
  ks = jax.random.split(jax.random.key(1), 3)
  return ConvFirstBlockParams(jax.random.normal(ks[0], (k, k, 8, c)), jnp.zeros(c),
                              jax.random.normal(ks[1], (c, e * c)), jnp.zeros(e * c),
                              jax.random.normal(ks[2], (e * c, c)), jnp.zeros(c))


def _mbconv_params(c, e, k):
  ks = jax.random.split(jax.random.key(2), 3)
  return MBConvBlockParams(jax.random.normal(ks[0], (c, e * c)), jnp.zeros(e * c),
                           jax.random.normal(ks[1], (k, k, 8, e * c)), jnp.zeros(e * c),
                           jax.random.normal(ks[2], (e * c, c)), jnp.zeros(c))


@pytest.mark.parametrize("c,k", [(64, 3), (192, 5)])
def test_convfirst_lowers(c, k):
  params = _convfirst_params(c, 4, k)
  _lower_for_cuda(lambda x: cf_triton.convfirst_block_pallas(x, params), _abstract((2, 9, 13, c)))


@pytest.mark.parametrize("c,halo_scratch", [(256, False), (768, False), (256, True)])
def test_mbconv_lowers(c, halo_scratch):
  params = _mbconv_params(c, 4, 3)
  cfg = dataclasses.replace(cf_triton.default_config("mbconv", c, 4 * c),
                            halo_scratch=halo_scratch)
  _lower_for_cuda(lambda x: cf_triton.mbconv_block_pallas(x, params, config=cfg),
                  _abstract((2, 14, 14, c)))


@pytest.mark.parametrize("c,k", [(64, 3), (1024, 3), (96, 5)])
def test_grouped_conv_training_kernels_lower(c, k):
  kernel = jax.random.normal(jax.random.key(3), (k, k, 8, c))
  cfg = gc_triton.default_config(c, k)
  x = _abstract((2, 9, 13, c))
  _lower_for_cuda(lambda x: gc_triton._conv(x, kernel.astype(x.dtype), cfg, False, "fwd"), x)
  _lower_for_cuda(lambda x, g: gc_triton._wgrad(x, g, k, cfg, False), x, x)
