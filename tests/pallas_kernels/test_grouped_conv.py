"""Pallas group-width-8 conv training layer (CPU interpreter) vs the XLA reference: forward,
input gradient and weight gradient, float32 (tight) and bfloat16.

The interpreter fills every output buffer with NaN before a kernel runs
(``test_convnext_block.test_interpreter_poisons_outputs``), so an element a kernel leaves
unwritten fails the finiteness checks below.  Small pixel tiles and a small weight-gradient
program budget force several pixel tiles and several pixel splits even on tiny images, so the
halo masking across tiles and the cross-split weight-gradient sum are exercised."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convfirst_jax as cj
import pallas_kernels
from pallas_kernels.convfirst_block import GroupedConvConfig, grouped_conv, grouped_conv_reference
from pallas_kernels.convfirst_block import grouped_conv_triton as gct
from tests import rand

F32_TOL = 1e-5
BF16_TOL = 1e-2
SMALL = GroupedConvConfig(block_pixels=16, wgrad_pixels=16, wgrad_programs=8)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _inputs(shape, k, seed):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  c = shape[-1]
  x = rand.normal(kx, shape, jnp.float32)
  w = rand.normal(kw, (k, k, 8, c), jnp.float32) / np.sqrt(8 * k * k)
  g = rand.normal(kg, shape, jnp.float32)
  return x, w, g


def _vjp(fn, x, w, g):
  y, pull = jax.vjp(fn, x, w)
  dx, dw = pull(g.astype(y.dtype))
  return y, dx, dw


def _check_all(got, want, tol, what):
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    a32 = np.asarray(a, np.float32)
    assert np.isfinite(a32).all(), f"{what} {name}: unwritten (NaN-poisoned) or non-finite"
    assert a.shape == b.shape, (what, name, a.shape, b.shape)
    err = _rel_err(a, b)
    assert err < tol, f"{what} {name}: relative error {err:.2e} >= {tol}"


# Every width ConvFirstNet's grouped conv sees: ConvFirst stages convolve C (32..192), MBConv
# stages the expanded 4C (512..3072, from convfirst_atto to convfirst_t/s), plus a width
# that is not a multiple of the 32-channel tile (40).  Odd H, W; batch 1 and 2.  float32 on
# every case, bfloat16 on one of each kind (the interpreter is slow on CI's 2 cores).
CASES = (
    [(c, 3, (2, 5, 7), c in (32, 192)) for c in (32, 64, 96, 128, 192)]
    + [(32, 5, (1, 7, 5), True), (192, 5, (1, 5, 3), False), (40, 3, (2, 3, 5), True)]
    + [(c, 3, (1, 3, 3), c in (512, 3072)) for c in (512, 1024, 1536, 2048, 3072)]
    + [(512, 5, (1, 3, 3), False)]
)
# (C, k, (N, H, W), also bfloat16)


@pytest.mark.parametrize("c,k,nhw,bf16", CASES,
                         ids=[f"C{c}-k{k}-{'x'.join(map(str, s))}" + ("-bf16" * b)
                              for c, k, s, b in CASES])
def test_forward_and_gradients(c, k, nhw, bf16):
  x, w, g = _inputs((*nhw, c), k, seed=100 * c + k)
  # Wide layers on tiny images: the default config keeps the interpreter's grid small.
  cfg = SMALL if c <= 192 else None
  pallas = functools.partial(grouped_conv, implementation="pallas", config=cfg, interpret=True)

  want = _vjp(grouped_conv_reference, x, w, g)
  _check_all(_vjp(pallas, x, w, g), want, F32_TOL, "float32")

  if not bf16:
    return
  # bfloat16 activations, float32 weights (bfloat16 compute, float32 parameters): against
  # the float32 layer on the same bf16-rounded activations.
  xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
  got = _vjp(pallas, xb, w, gb)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  assert got[2].dtype == jnp.float32
  want_b = _vjp(grouped_conv_reference, xb.astype(jnp.float32), w, gb.astype(jnp.float32))
  _check_all(got, want_b, BF16_TOL, "bfloat16")


def test_default_config_and_single_tile():
  # Default tiles (one pixel tile, one split) and the k=5 default (16-channel wgrad tile).
  for c, k in ((64, 3), (48, 5)):
    x, w, g = _inputs((1, 3, 6, c), k, seed=c)
    pallas = functools.partial(grouped_conv, implementation="pallas", interpret=True)
    _check_all(_vjp(pallas, x, w, g), _vjp(grouped_conv_reference, x, w, g), F32_TOL, (c, k))


def test_transpose_kernel_is_the_input_gradient_conv():
  # The input gradient of a same-padded conv is the conv with transpose_kernel's weights.
  x, w, g = _inputs((1, 5, 6, 24), 3, seed=7)
  _, pull = jax.vjp(lambda x: grouped_conv_reference(x, w), x)
  np.testing.assert_allclose(grouped_conv_reference(g, gct.transpose_kernel(w)), pull(g)[0],
                             rtol=1e-5, atol=1e-5)


def test_dispatch_and_errors():
  x, w, _ = _inputs((1, 3, 3, 32), 3, seed=1)
  ref = grouped_conv_reference(x, w)
  # None is XLA (faster on H100 for training; see RESULTS.md); "xla" likewise.
  np.testing.assert_array_equal(grouped_conv(x, w), ref)
  np.testing.assert_array_equal(grouped_conv(x, w, implementation="xla"), ref)
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="backend is 'cpu'.*interpret=True"):
      grouped_conv(x, w, implementation="pallas")
  with pytest.raises(NotImplementedError, match="float16"):
    grouped_conv(x.astype(jnp.float16), w, implementation="pallas", interpret=True)
  with pytest.raises(NotImplementedError, match="even kernel size 4"):
    grouped_conv(x, jnp.zeros((4, 4, 8, 32)), implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match=r"kernel must be \(k, k, 8, 32\)"):
    grouped_conv(x, jnp.zeros((3, 3, 4, 32)))
  with pytest.raises(ValueError, match="rank 4"):
    grouped_conv(x[0], w)
  with pytest.raises(ValueError, match="implementation must be one of"):
    grouped_conv(x, w, implementation="triton")


def _interpreted(monkeypatch):
  """Route the blocks' ``pallas_kernels.grouped_conv`` to the interpreter; record calls."""
  calls = []

  def interpreted(x, kernel, *, implementation=None):
    calls.append((x.shape, implementation))
    return grouped_conv(x, kernel, implementation=implementation, interpret=True)
  monkeypatch.setattr(pallas_kernels, "grouped_conv", interpreted)
  return calls


def _grad_errors(grads, want):
  """Relative error of every gradient leaf.  A gradient that is zero in exact arithmetic
  (in a ConvFirst block, bn_group's bias: a per-channel constant that fc1 maps to a
  constant which bn1's batch mean removes) is rounding noise in both runs, so leaves below
  1e-5 of the largest gradient's norm are measured against that norm instead."""
  pairs = [(jax.tree_util.keystr(path), np.asarray(a, np.float64), np.asarray(b, np.float64))
           for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                        jax.tree_util.tree_leaves_with_path(want))]
  scale = max(np.linalg.norm(b) for _, _, b in pairs)
  out = {}
  for name, a, b in pairs:
    assert np.isfinite(a).all(), name
    nb = np.linalg.norm(b)
    out[name] = np.linalg.norm(a - b) / (nb if nb >= 1e-5 * scale else scale)
  return out


def test_model_uses_pallas_layer_in_eval_and_training_kernels_in_training(
    monkeypatch, randomise_batchnorm):
  """A small ConvFirstNet (one block per stage, both block types) with block_impl="pallas":
  a training step's gradient (traced only, to keep CI fast; the numbers are checked per
  block in test_convfirst_train.py / test_mbconv_train.py) sends every ConvFirst block
  through ``convfirst_block_train``, every MBConv block through ``mbconv_block_train`` and
  the stem and downsampling BatchNorms through ``batch_norm_act``, all with implementation
  "pallas" (recorded, then run on CPU: the ConvFirst block as "fold" since the Mosaic
  kernels take no float32, the others in the interpreter) and no grouped conv through the
  Pallas layer; in eval mode (unfolded, BatchNorm running statistics) every block's grouped
  conv is the Pallas layer's and the logits match block_impl="xla"."""
  from flax import nnx
  calls = _interpreted(monkeypatch)
  train_calls, mb_calls, bn_calls = [], [], []
  block_train = pallas_kernels.convfirst_block_train
  mbconv_train = pallas_kernels.mbconv_block_train
  batch_norm = pallas_kernels.batch_norm_act

  def recorded(x, params, drop_scale=None, *, implementation=None, **kw):
    train_calls.append((x.shape, implementation))
    return block_train(x, params, drop_scale, implementation="fold", **kw)

  def recorded_mb(x, params, drop_scale=None, *, implementation=None, **kw):
    mb_calls.append((x.shape, implementation))
    return mbconv_train(x, params, drop_scale, implementation=implementation,
                        interpret=True, **kw)

  def recorded_bn(z, scale, bias, *, implementation=None, **kw):
    bn_calls.append((z.shape, implementation))
    return batch_norm(z, scale, bias, implementation=implementation, interpret=True, **kw)
  monkeypatch.setattr(pallas_kernels, "convfirst_block_train", recorded)
  monkeypatch.setattr(pallas_kernels, "mbconv_block_train", recorded_mb)
  monkeypatch.setattr(pallas_kernels, "batch_norm_act", recorded_bn)
  x = rand.normal(jax.random.key(1), (2, 32, 32, 3))

  def model(impl):
    m = cj.ConvFirstNet(depths=(1, 1, 1, 1), dims=(32, 32, 48, 64), num_classes=3,
                        block_impl=impl, zero_init_last=False, rngs=nnx.Rngs(0))
    randomise_batchnorm(m)
    return m

  m = model("pallas")
  m.train()
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params):
    out = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))(x)
    return jnp.mean(out ** 2)
  grads = jax.eval_shape(jax.grad(loss), params)
  n_blocks = sum(m.depths)
  assert calls == [], calls  # no Pallas grouped-conv layer in training
  assert [c for c, _ in train_calls] == [(2, 8, 8, 32), (2, 4, 4, 32)], train_calls
  assert [c for c, _ in mb_calls] == [(2, 2, 2, 48), (2, 1, 1, 64)], mb_calls
  # the stem (2 x 8 x 8 pixels, 32 channels) and the three downsampling layers
  assert [c for c, _ in bn_calls] == [(128, 32), (32, 32), (8, 48), (2, 64)], bn_calls
  assert all(impl == "pallas" for _, impl in train_calls + mb_calls + bn_calls)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), grads) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), params)

  calls.clear()
  xla, pallas = model("xla"), model("pallas")
  xla.eval(), pallas.eval()
  ref = np.asarray(xla(x))
  out = np.asarray(pallas(x))
  assert len(calls) == n_blocks
  assert np.abs(ref).max() > 1e-2
  assert _rel_err(out, ref) < 1e-5
