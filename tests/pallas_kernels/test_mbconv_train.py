"""The MBConv training block with hand-written BatchNorm backward passes
(pallas_kernels.mbconv_block_train; the reductions as Pallas-Triton kernels in interpret
mode) against the block as written (implementation="xla", what flax's modules compute):
value, batch statistics and the gradients of x and every parameter; the model's
training-mode MBConv block and ConvBN layers against flax's BatchNorm modules.

Tolerances: float32 1e-4 relative (the same sums in another order); bfloat16 results are
compared with the float32 block as written on the same (rounded) input, to 2e-2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convfirst_jax as cj
import pallas_kernels
from tests import rand
from tests.pallas_kernels.train_block_checks import (compare, compare_layer_runs, rel,
                                                     value_and_grads)

F32 = jnp.float32


def _params(seed, c, e, k=3):
  ks = jax.random.split(jax.random.key(seed), 9)
  n = rand.normal
  return pallas_kernels.MBConvTrainParams(
      fc1_kernel=n(ks[0], (c, e)) / c ** 0.5, bn1_scale=1 + 0.2 * n(ks[1], (e,)),
      bn1_bias=0.2 * n(ks[2], (e,)), conv_kernel=n(ks[3], (k, k, 8, e)) / (8 * k * k) ** 0.5,
      bn_conv_scale=1 + 0.2 * n(ks[4], (e,)), bn_conv_bias=0.2 * n(ks[5], (e,)),
      fc2_kernel=n(ks[6], (e, c)) / e ** 0.5, bn2_scale=1 + 0.2 * n(ks[7], (c,)),
      bn2_bias=0.2 * n(ks[8], (c,)))


def _value_and_grads(x, params, dps, dy, implementation, interpret=False):
  return value_and_grads(lambda *a, **k: pallas_kernels.mbconv_block_train(*a, **k),
                         x, params, dps, dy, implementation, interpret)


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,c,k", [
    ((2, 5, 7), 32, 3),   # odd H and W
    ((1, 3, 5), 128, 5),  # batch 1, k = 5; convfirst_atto stage 3
    ((2, 3, 3), 256, 3),  # atto stage 4 / nano stage 3
    ((1, 3, 3), 384, 3),  # convfirst_t stage 3
    ((2, 1, 3), 512, 3),  # nano stage 4
    ((2, 3, 3), 768, 3),  # convfirst_t stage 4 (7x7 at 224x224)
])
def test_kernels_match_block_as_written(dtype, tol, shape, c, k):
  params = _params(c + k, c, 4 * c, k)
  x = (rand.normal(jax.random.key(1), (*shape, c)) + 0.5).astype(dtype)
  dy = rand.normal(jax.random.key(2), x.shape)
  dps = jnp.array([2.0, 0.0])[:shape[0]]  # one image dropped, one scaled (batch 2)
  want = _value_and_grads(x.astype(F32), params, dps, dy, "xla")
  got = _value_and_grads(x, params, dps, dy, "pallas", interpret=True)
  assert got[0].dtype == dtype and got[2].dtype == dtype
  baseline = None if dtype == F32 else _value_and_grads(x, params, dps, dy, "xla")
  compare(got, want, tol, baseline=baseline)
  if shape[0] == 2:  # the dropped image's branch is gone: y = x exactly
    np.testing.assert_array_equal(np.asarray(got[0][1], F32), np.asarray(x[1], F32))


def test_none_off_gpu_is_the_same_function_with_xla_reductions():
  params = _params(0, 32, 128)
  x = rand.normal(jax.random.key(3), (2, 5, 3, 32))
  dy = rand.normal(jax.random.key(4), x.shape)
  want = _value_and_grads(x, params, None, dy, "xla")
  got = _value_and_grads(x, params, None, dy, None)
  compare(got, want, 1e-4)
  if jax.default_backend() != "gpu":
    jaxpr = str(jax.make_jaxpr(lambda x: pallas_kernels.mbconv_block_train(x, params))(x))
    assert "pallas_call" not in jaxpr


def test_errors_name_the_problem():
  params = _params(0, 32, 128)
  x = jnp.ones((1, 4, 4, 32))
  with pytest.raises(ValueError, match="implementation must be"):
    pallas_kernels.mbconv_block_train(x, params, implementation="fold")
  with pytest.raises(ValueError, match="rank 4"):
    pallas_kernels.mbconv_block_train(x[0], params)
  with pytest.raises(ValueError, match=r"params.conv_kernel has shape \(3, 3, 8, 64\)"):
    pallas_kernels.mbconv_block_train(
        x, params._replace(conv_kernel=jnp.ones((3, 3, 8, 64))))
  with pytest.raises(ValueError, match="multiple of the group width"):
    pallas_kernels.mbconv_block_train(
        x, params._replace(fc1_kernel=jnp.ones((32, 20))))
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="need a GPU backend"):
      pallas_kernels.mbconv_block_train(x, params, implementation="pallas")


def _train_and_grads(module, x):
  module.train()

  def loss(module):
    return jnp.sum(module(x) ** 2)
  grads = nnx.grad(loss)(module)
  return module(x), grads, nnx.state(module, nnx.BatchStat)


@pytest.mark.parametrize("layer", ["mbconv", "convbn"])
def test_model_layers_match_flax_modules(layer):
  """MBConvBlock and ConvBN in train mode: implementation None vs "xla" (flax's BatchNorm
  modules) -- output, gradients of every parameter, running averages."""
  def run(impl):
    if layer == "mbconv":
      m = cj.MBConvBlock(32, implementation=impl, zero_init_last=False, rngs=nnx.Rngs(0))
      m.bn_group.bias[...] = 0.3 * rand.normal(jax.random.key(8), (128,))
      x = rand.normal(jax.random.key(7), (2, 5, 7, 32)) + 0.5
    else:
      from convfirst_jax.convfirst import ConvBN
      m = ConvBN(16, 32, 2, 2, implementation=impl, dtype=F32, param_dtype=F32,
                 rngs=nnx.Rngs(0))
      x = rand.normal(jax.random.key(7), (2, 6, 10, 16)) + 0.5
    return _train_and_grads(m, x)
  compare_layer_runs(run(None), run("xla"), 6 if layer == "mbconv" else 2)


def test_model_block_with_pallas_in_interpreter_matches_xla(monkeypatch):
  """MBConvBlock in train mode with implementation="pallas" (the BatchNorm kernels in the
  interpreter) against "xla": value, every parameter gradient, x's gradient, running
  averages (float32)."""
  import functools
  monkeypatch.setattr(pallas_kernels, "mbconv_block_train",
                      functools.partial(pallas_kernels.mbconv_block_train, interpret=True))
  x = rand.normal(jax.random.key(9), (2, 7, 5, 64))
  g = rand.normal(jax.random.key(10), x.shape)

  def run(impl):
    m = cj.MBConvBlock(64, implementation=impl, zero_init_last=False, rngs=nnx.Rngs(0))
    m.train()
    loss = lambda m, x: jnp.sum(m(x) * g)
    val, (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1))(m, x)
    return val, gm, gx, nnx.state(m, nnx.BatchStat)
  vp, gmp, gxp, sp = run("pallas")
  vx, gmx, gxx, sx = run("xla")
  assert abs(float(vp) - float(vx)) <= 1e-5 * abs(float(vx))
  assert rel(gxp, gxx) < 1e-4
  for a, b in zip(jax.tree.leaves(gmp), jax.tree.leaves(gmx)):
    assert float(jnp.abs(a - b).max()) < 1e-4 * max(float(jnp.abs(b).max()), 1.0)
  for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(sx)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,c", [((4, 15, 13, 64), 64), ((128, 14, 14, 256), 256),
                                     ((3, 7, 7, 768), 768)])
def test_compiled_kernels_on_gpu(shape, c):
  params = _params(1, c, 4 * c)
  x = (rand.normal(jax.random.key(5), (*shape[:3], c)) + 0.5).astype(jnp.bfloat16)
  dy = rand.normal(jax.random.key(6), x.shape)
  dps = jnp.ones((shape[0],)).at[0].set(0.0)
  want = _value_and_grads(x.astype(F32), params, dps, dy, "xla")
  got = _value_and_grads(x, params, dps, dy, "pallas")
  compare(got, want, 3e-2)
