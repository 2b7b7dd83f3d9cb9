"""Fused ConvFirst / MBConv inference kernels (Pallas, CPU interpret mode) vs the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convfirst_jax as cj
import pallas_kernels
from pallas_kernels.convfirst_block import (
    ConvFirstBlockParams,
    MBConvBlockParams,
    convfirst_block,
    convfirst_block_reference,
    grouped_conv_reference,
    mbconv_block,
    mbconv_block_reference,
    mbconv_stage,
)
from pallas_kernels.convfirst_block import convfirst_stage, pallas_triton
from tests import rand

# Norm-relative error ||out - ref|| / ||ref||: float32 kernels do exact float32 dots; with
# bfloat16 operands and intermediates the error is a few 1e-3.
F32_TOL = 1e-5
BF16_TOL = 1e-2


def _params(kind, key, c, k, expansion=4):
  hidden = c * expansion
  ks = jax.random.split(key, 6)
  conv_c = c if kind == "convfirst" else hidden
  normal = rand.normal
  conv = (normal(ks[0], (k, k, 8, conv_c)) / np.sqrt(8 * k * k),
          0.1 * normal(ks[1], (conv_c,)))
  fc1 = (normal(ks[2], (c, hidden)) / np.sqrt(c), 0.1 * normal(ks[3], (hidden,)))
  fc2 = (normal(ks[4], (hidden, c)) / np.sqrt(hidden), 0.1 * normal(ks[5], (c,)))
  if kind == "convfirst":
    return ConvFirstBlockParams(*conv, *fc1, *fc2)
  return MBConvBlockParams(*fc1, *conv, *fc2)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


KERNELS = {
    "convfirst": (pallas_triton.convfirst_block_pallas, convfirst_block_reference),
    "mbconv": (pallas_triton.mbconv_block_pallas, mbconv_block_reference),
}

# Every width ConvFirstNet uses: ConvFirst stages 32..192, MBConv stages 128..768; tiny odd
# images (smaller than a tile) and batch 1 and 2.  float32 on every case, bfloat16 on the
# smallest and largest width of each kind and kernel size (the interpreter is slow on CI's
# 2 cores; 2026-11-27: bfloat16 on every case took ~50 s more).
CASES = (
    [("convfirst", c, 3, (2, 5, 7), c in (32, 192)) for c in (32, 64, 96, 128, 192)]
    + [("convfirst", c, 5, (1, 7, 5), c in (32, 192)) for c in (32, 96, 192)]
    + [("mbconv", c, 3, (2, 5, 7), c == 128) for c in (128, 256, 384)]
    + [("mbconv", c, 3, (1, 3, 5), c == 768) for c in (512, 768)]
    + [("mbconv", c, 5, (1, 5, 3), True) for c in (128, 384)]
)


@pytest.mark.parametrize("kind,c,k,nhw,bf16", CASES,
                         ids=[f"{a}-C{c}-k{k}-{'x'.join(map(str, s))}" + "-bf16" * b
                              for a, c, k, s, b in CASES])
def test_forward_matches_reference(kind, c, k, nhw, bf16):
  kernel, reference = KERNELS[kind]
  seed = 1000 * c + 10 * k + (kind == "mbconv")
  kx, kp = jax.random.split(jax.random.key(seed))
  x = rand.normal(kx, (*nhw, c), jnp.float32)
  params = _params(kind, kp, c, k)
  poison = lambda dtype: jnp.full(x.shape, jnp.nan, dtype)

  out = kernel(x, params, output_init=poison(jnp.float32), interpret=True)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all(), "unwritten (NaN-poisoned) outputs"
  assert _rel_err(out, reference(x, params)) < F32_TOL
  if not bf16:
    return

  xb = x.astype(jnp.bfloat16)
  outb = kernel(xb, params, output_init=poison(jnp.bfloat16), interpret=True)
  assert outb.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(outb, np.float32)).all(), "unwritten (NaN-poisoned) outputs"
  # Against the float32 block on the same (bf16-rounded) input, and against the XLA bf16 path.
  assert _rel_err(outb, reference(xb.astype(jnp.float32), params)) < BF16_TOL
  assert _rel_err(outb, reference(xb, params)) < BF16_TOL


def test_non_power_of_two_hidden_and_expansion_6():
  # 64 x E6 (the 64x64x64 E6 benchmark shape) and a width whose tile is padded (C=40).
  for kind, c, e in (("convfirst", 64, 6), ("convfirst", 40, 4), ("mbconv", 40, 6)):
    kernel, reference = KERNELS[kind]
    kx, kp = jax.random.split(jax.random.key(c * e))
    x = rand.normal(kx, (1, 4, 9, c), jnp.float32)
    params = _params(kind, kp, c, 3, expansion=e)
    out = kernel(x, params, output_init=jnp.full(x.shape, jnp.nan), interpret=True)
    assert _rel_err(out, reference(x, params)) < F32_TOL, (kind, c, e)


def test_block_diagonal_weight_matches_grouped_conv():
  # The dense block-diagonal tiles reproduce the grouped conv exactly (float32).
  kx, kw = jax.random.split(jax.random.key(3))
  c, k = 48, 3
  x = rand.normal(kx, (1, 4, 4, c))
  w = rand.normal(kw, (k, k, 8, c))
  dense = pallas_triton.block_diagonal_conv_weight(w, 16, c, jnp.float32)
  # Placing tile j's (16 x 16) block at rows and columns j*16.. gives the grouped conv's
  # (C, C) per-tap matrix.
  full = jnp.zeros((k * k, c, c))
  for j in range(c // 16):
    tile = slice(j * 16, (j + 1) * 16)
    full = full.at[:, tile, tile].set(dense[:, tile, :])
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(xp[:, dy:dy + 4, dx:dx + 4] @ full[dy * k + dx]
            for dy in range(k) for dx in range(k))
  np.testing.assert_allclose(out, grouped_conv_reference(x, w),
                             rtol=1e-5, atol=1e-5)


def test_dispatch(monkeypatch):
  x = rand.normal(jax.random.key(0), (1, 3, 3, 32))
  params = _params("convfirst", jax.random.key(1), 32, 3)
  ref = convfirst_block_reference(x, params)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu:
    with pytest.raises(NotImplementedError, match="backend is 'cpu'.*interpret=True"):
      convfirst_block(x, params, implementation="pallas")
    # None falls back to XLA off GPU.
    np.testing.assert_array_equal(convfirst_block(x, params), ref)
  out = convfirst_block(x, params, implementation="pallas", interpret=True)
  assert _rel_err(out, ref) < F32_TOL
  # None keeps XLA below MIN_ROWS_FOR_PALLAS pixels even where the kernel could run, and
  # runs the kernel from there on.
  from pallas_kernels.convfirst_block import api as convfirst_api
  assert x.shape[0] * x.shape[1] * x.shape[2] < convfirst_api.MIN_ROWS_FOR_PALLAS
  assert not np.array_equal(out, ref)  # the two paths are distinguishable
  np.testing.assert_array_equal(convfirst_block(x, params, interpret=True), ref)
  monkeypatch.setattr(convfirst_api, "MIN_ROWS_FOR_PALLAS", 9)
  np.testing.assert_array_equal(convfirst_block(x, params, interpret=True), out)
  with pytest.raises(NotImplementedError, match="float16"):
    convfirst_block(x.astype(jnp.float16), params, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="implementation must be one of"):
    mbconv_block(x, _params("mbconv", jax.random.key(1), 32, 3), implementation="triton")


def test_folded_model_pallas_matches_xla(monkeypatch, randomise_batchnorm):
  model = cj.create_model("convfirst_atto", num_classes=10, rngs=0)
  randomise_batchnorm(model)
  model.eval()
  xla = cj.fold_batchnorm(model, block_impl="xla")
  pallas = cj.fold_batchnorm(model, block_impl="pallas")
  # The folded blocks call the public functions; run them in interpret mode on CPU.
  monkeypatch.setattr(pallas_kernels, "convfirst_block",
                      functools.partial(convfirst_block, interpret=True))
  monkeypatch.setattr(pallas_kernels, "mbconv_block",
                      functools.partial(mbconv_block, interpret=True))
  monkeypatch.setattr(pallas_kernels, "mbconv_stage",
                      functools.partial(mbconv_stage, interpret=True))
  monkeypatch.setattr(pallas_kernels, "convfirst_stage",
                      functools.partial(convfirst_stage, interpret=True))
  x = rand.normal(jax.random.key(1), (2, 32, 32, 3))
  ref = np.asarray(xla(x))
  out = np.asarray(pallas(x))
  assert np.abs(ref).max() > 1e-2
  assert _rel_err(out, ref) < F32_TOL


def test_folded_bf16_model_runs_its_stages_in_the_mosaic_form(monkeypatch,
                                                              randomise_batchnorm):
  """In bfloat16 the folded model's stages run as Mosaic chains in the padded-row layout
  (interpreter) -- the ConvFirst stages (C = 32 and 64) and the MBConv stages (C = 128 and
  256, E = 4) -- and match the XLA model."""
  from pallas_kernels.convfirst_block import api
  model = cj.create_model("convfirst_atto", num_classes=10, depths=(1, 1, 2, 1), rngs=0)
  randomise_batchnorm(model)
  model.eval()
  xla = cj.fold_batchnorm(model, block_impl="xla", dtype=jnp.bfloat16)
  pallas = cj.fold_batchnorm(model, block_impl="pallas", dtype=jnp.bfloat16)
  kinds = []

  def spy(real):
    def kernel(*a, **k):
      kinds.append(real(*a, **k))
      return kinds[-1]
    return kernel

  monkeypatch.setattr(api, "mbconv_stage_kernel", spy(api.mbconv_stage_kernel))
  monkeypatch.setattr(api, "convfirst_stage_kernel", spy(api.convfirst_stage_kernel))
  monkeypatch.setattr(pallas_kernels, "mbconv_stage",
                      functools.partial(mbconv_stage, interpret=True))
  monkeypatch.setattr(pallas_kernels, "convfirst_stage",
                      functools.partial(convfirst_stage, interpret=True))
  x = rand.normal(jax.random.key(2), (1, 32, 32, 3))
  # The two XLA models jitted: one compilation each instead of one per eager op (a few
  # seconds less on a 2-core CPU; both errors below came out the same to the last digit as
  # eagerly).  The Pallas model runs eagerly, as before.
  run_jitted = nnx.jit(lambda m, x: m(x))
  ref = np.asarray(run_jitted(cj.fold_batchnorm(model, block_impl="xla"), x))   # float32
  kinds.clear()
  out = np.asarray(pallas(x).astype(jnp.float32))
  assert kinds == ["mosaic"] * 4
  assert np.abs(ref).max() > 1e-2
  # as close to the float32 model as XLA's own bfloat16 model is
  xla_err = _rel_err(np.asarray(run_jitted(xla, x).astype(jnp.float32)), ref)
  assert _rel_err(out, ref) < max(1.5 * xla_err, BF16_TOL)
