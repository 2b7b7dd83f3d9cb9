"""The ConvFirst training block with its BatchNorms folded from batch statistics
(pallas_kernels.convfirst_block_train) against the block as written (implementation="xla",
which is what flax's modules compute): value, batch statistics and the gradients of x and
every parameter; the Mosaic pointwise kernels in the Mosaic GPU interpreter; the model's
training-mode block.

Tolerances: float32 1e-4 relative (the fold reorders float32 sums over the batch: the
variance of a comes from g's covariance, not from a itself). bfloat16 results are compared
with the float32 block as written on the same (bf16-rounded) input, to 2e-2: the fold's
largest error there is 1.2e-2 on these shapes, bf16 XLA's own 1.7e-2. The gradient of BN_g's
bias is zero in exact arithmetic (BN_1 removes any per-channel shift of its input's
product), so it is compared to the scale of the other parameters' gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convfirst_jax as cj
import pallas_kernels
from pallas_kernels.convfirst_block import train
from tests import rand
from tests.pallas_kernels.train_block_checks import (compare, compare_layer_runs,
                                                     value_and_grads)

F32 = jnp.float32


def _params(seed, c, e, k=3):
  ks = jax.random.split(jax.random.key(seed), 9)
  n = rand.normal
  return pallas_kernels.ConvFirstTrainParams(
      conv_kernel=n(ks[0], (k, k, 8, c)) / (8 * k * k) ** 0.5,
      bn_conv_scale=1 + 0.2 * n(ks[1], (c,)), bn_conv_bias=0.2 * n(ks[2], (c,)),
      fc1_kernel=n(ks[3], (c, e)) / c ** 0.5, bn1_scale=1 + 0.2 * n(ks[4], (e,)),
      bn1_bias=0.2 * n(ks[5], (e,)), fc2_kernel=n(ks[6], (e, c)) / e ** 0.5,
      bn2_scale=1 + 0.2 * n(ks[7], (c,)), bn2_bias=0.2 * n(ks[8], (c,)))


def _value_and_grads(x, params, dps, dy, implementation, interpret=False):
  return value_and_grads(lambda *a, **k: pallas_kernels.convfirst_block_train(*a, **k),
                         x, params, dps, dy, implementation, interpret)


def _compare(got, want, tol, baseline=None):
  # BN_g's bias gradient is zero in exact arithmetic (module docstring).
  compare(got, want, tol, zero_grad_fields=("bn_conv_bias",), baseline=baseline)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,c,k", [
    ((2, 5, 7), 32, 3),   # odd H and W; convfirst_atto stage 1
    ((1, 6, 5), 64, 5),   # batch 1, k = 5; atto stage 2 / nano stage 1
    ((2, 3, 3), 96, 3),   # convfirst_t stage 1
    ((2, 3, 5), 128, 3),  # nano stage 2
    ((1, 3, 3), 192, 3),  # convfirst_t stage 2
])
def test_fold_matches_block_as_written(dtype, tol, shape, c, k):
  e = 4 * c
  params = _params(c + k, c, e, k)
  x = (rand.normal(jax.random.key(1), (*shape, c)) + 0.5).astype(dtype)
  dy = rand.normal(jax.random.key(2), x.shape)
  dps = jnp.array([2.0, 0.0])[:shape[0]]  # one image dropped, one scaled (batch 2)
  want = _value_and_grads(x.astype(F32), params, dps, dy, "xla")
  got = _value_and_grads(x, params, dps, dy, "fold")
  assert got[0].dtype == dtype and got[2].dtype == dtype
  baseline = None if dtype == F32 else _value_and_grads(x, params, dps, dy, "xla")
  _compare(got, want, tol, baseline)
  if shape[0] == 2:  # the dropped image's branch is gone: y = x exactly
    np.testing.assert_array_equal(np.asarray(got[0][1], np.float32), np.asarray(x[1], np.float32))


@pytest.mark.parametrize("shape,c,bwd_block_m", [((2, 5, 7), 32, 64), ((1, 5, 9), 96, 64),
                                                 ((1, 3, 5), 192, 64), ((2, 5, 7), 32, 128)])
def test_mosaic_pointwise_in_interpreter(shape, c, bwd_block_m, monkeypatch):
  """implementation="pallas" (the Mosaic forward + backward kernels, in the interpreter) in
  bfloat16 vs the float32 block as written; 70, 45 and 15 rows (not multiples of the 64- or
  128-row tiles; C=192 runs the 128-row forward kernel and the backward without its g copy);
  ``bwd_block_m`` 128: the two-warpgroup backward kernel."""
  monkeypatch.setattr(train, "BWD_BLOCK_M", bwd_block_m)
  e = 4 * c
  params = _params(c, c, e)
  x = (rand.normal(jax.random.key(3), (*shape, c)) + 0.5).astype(jnp.bfloat16)
  dy = rand.normal(jax.random.key(4), x.shape)
  dps = jnp.array([1.0, 0.5])[:shape[0]]
  want = _value_and_grads(x.astype(F32), params, dps, dy, "xla")
  got = _value_and_grads(x, params, dps, dy, "pallas", interpret=True)
  assert got[0].dtype == jnp.bfloat16
  _compare(got, want, 2e-2)


def test_implementation_choice_and_errors():
  params = _params(0, 32, 128)
  x = jnp.ones((1, 4, 4, 32), jnp.bfloat16)
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="implementation='pallas'.*backend"):
      pallas_kernels.convfirst_block_train(x, params, implementation="pallas")
    y_none, _ = pallas_kernels.convfirst_block_train(x, params)  # falls back to "fold"
    y_fold, _ = pallas_kernels.convfirst_block_train(x, params, implementation="fold")
    np.testing.assert_array_equal(np.asarray(y_none, np.float32), np.asarray(y_fold, np.float32))
  with pytest.raises(NotImplementedError, match="bfloat16/float16"):  # Mosaic takes no f32
    pallas_kernels.convfirst_block_train(x.astype(F32), params, implementation="pallas",
                                         interpret=True)
  with pytest.raises(ValueError, match="implementation must be"):
    pallas_kernels.convfirst_block_train(x, params, implementation="triton")
  with pytest.raises(ValueError, match="rank 4"):
    pallas_kernels.convfirst_block_train(x[0], params)
  with pytest.raises(ValueError, match=r"params.fc2_kernel has shape \(128, 16\)"):
    pallas_kernels.convfirst_block_train(x, params._replace(fc2_kernel=jnp.ones((128, 16))))
  with pytest.raises(ValueError, match="multiples of the group width"):
    pallas_kernels.convfirst_block_train(jnp.ones((1, 4, 4, 12)), params)


def test_statistics_from_covariance():
  """fold_batchnorm_dense: the product's batch mean and variance from its input's mean and
  covariance, against the product computed and reduced directly (float32)."""
  u = rand.normal(jax.random.key(5), (300, 24)) * 3 + 1
  w = rand.normal(jax.random.key(6), (24, 40))
  mean, cov = train.mean_and_cov(u)
  w1, b1, (mean_a, var_a) = train.fold_batchnorm_dense(mean, cov, w, jnp.full((40,), 2.0),
                                                       jnp.full((40,), 0.5), 1e-5)
  a = u @ w
  np.testing.assert_allclose(mean_a, a.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(var_a, a.var(0), rtol=1e-4)
  bn = (a - a.mean(0)) / jnp.sqrt(a.var(0) + 1e-5) * 2.0 + 0.5
  np.testing.assert_allclose(u @ w1 + b1, bn, rtol=1e-4, atol=1e-4)


def test_model_training_block_matches_flax_modules():
  """ConvFirstBlock in train mode: implementation None (the fold) vs "xla" (flax's
  BatchNorm modules) -- output, gradients of every parameter, running averages."""
  def run(impl):
    block = cj.ConvFirstBlock(32, implementation=impl, zero_init_last=False,
                              rngs=nnx.Rngs(0))
    block.bn_group.bias[...] = 0.3 * rand.normal(jax.random.key(8), (32,))
    block.train()
    x = rand.normal(jax.random.key(7), (2, 5, 7, 32)) + 0.5

    def loss(block):
      return jnp.sum(block(x) ** 2)
    grads = nnx.grad(loss)(block)
    return block(x), grads, nnx.state(block, nnx.BatchStat)
  compare_layer_runs(run(None), run("xla"), 6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,c", [((4, 15, 13, 64), 64), ((3, 11, 9, 96), 96),
                                     ((2, 9, 7, 192), 192), ((1, 7, 7, 32), 32)])
def test_compiled_mosaic_pointwise_on_gpu(shape, c):
  """The compiled Mosaic kernels (Hopper) against the block as written, both bfloat16
  (3e-2: both round their intermediates; passed on an H100, 2026-11-27)."""
  from pallas_kernels import mosaic_mlp
  if mosaic_mlp.device_unsupported_reason(False) is not None:
    pytest.skip(mosaic_mlp.device_unsupported_reason(False))
  params = _params(c + 1, c, 4 * c)
  x = (rand.normal(jax.random.key(9), shape) + 0.5).astype(jnp.bfloat16)
  dy = rand.normal(jax.random.key(10), x.shape)
  dps = jnp.where(jnp.arange(shape[0]) % 3 == 1, 0.0, 1.25)
  want = _value_and_grads(x, params, dps, dy, "xla")
  got = _value_and_grads(x, params, dps, dy, "pallas")
  _compare(got, want, 3e-2)


@pytest.mark.parametrize("shape,bwd_block_m", [((128, 56, 56, 96), 64),
                                               ((128, 56, 56, 96), 128),
                                               ((128, 28, 28, 192), 64),
                                               ((128, 28, 28, 192), 128)])
def test_pointwise_kernels_lower_for_cuda(shape, bwd_block_m, monkeypatch):
  """convfirst_t's ConvFirst training shapes: the Mosaic forward (without a residual) and
  backward kernels, with the settings ``convfirst_block_train`` picks (and the 128-row
  backward), through Mosaic GPU's own lowering (runs on a CPU)."""
  from pallas_kernels import mosaic_mlp_bwd
  monkeypatch.setattr(train, "BWD_BLOCK_M", bwd_block_m)
  n, h, w, c = shape
  m, e = n * h * w, 4 * c
  cfg, reason = train._mosaic_mlp_config(m, c, e, jnp.bfloat16)
  assert reason is None and cfg["hidden_chunk"] == 64
  assert cfg.get("block_m", 64) == (128 if c >= 192 else 64)
  assert cfg.get("bwd_block_m", 64) == bwd_block_m

  def loss(z, w1, b1, w2):
    p = mosaic_mlp_bwd.mlp_with_grad(z, None, w1, b1, w2, jnp.zeros((c,)), act="silu",
                                     normalize=False, **cfg)
    return jnp.sum(p.astype(F32))
  args = (jax.ShapeDtypeStruct((m, c), jnp.bfloat16), jax.ShapeDtypeStruct((c, e), F32),
          jax.ShapeDtypeStruct((e,), F32), jax.ShapeDtypeStruct((e, c), F32))
  jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
      lowering_platforms=("cuda",))
