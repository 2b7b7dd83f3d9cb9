"""Model construction, shapes, modes, determinism, jit and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convfirst_jax as cj
from convfirst_jax.convnext import ConvNeXt
from tests import rand

SMALL = ["convnext_atto", "convnext_femto", "convfirst_atto", "convfirst_nano"]


def _images(n=2, size=32, seed=0, c=3):
  return rand.normal(jax.random.key(seed), (n, size, size, c), jnp.float32)


@pytest.mark.parametrize("name", cj.list_models())
def test_every_registered_model_output_shape(name):
  # Abstract evaluation: exact shapes of every model (large ones included) without
  # allocating their weights.
  model = nnx.eval_shape(lambda: cj.create_model(name, num_classes=7))
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.float32))
  assert out.shape == (3, 7) and out.dtype == jnp.float32
  feats = jax.eval_shape(lambda m, x: m.forward_features(x), model,
                         jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
  assert feats.shape == (1, 2, 3, model.dims[-1])


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run_and_are_finite(name):
  model = cj.create_model(name, num_classes=5, rngs=0)
  model.eval()
  y = model(_images(size=40))            # 40 is not a multiple of 32: floor division
  assert y.shape == (2, 5)
  assert np.all(np.isfinite(np.asarray(y)))


def test_list_models_pattern_and_unknown_name():
  assert cj.list_models("convnext_*") == sorted(
      f"convnext_{v}" for v in "atto femto pico nano tiny small base large".split())
  assert {"convfirst_atto", "convfirst_nano", "convfirst_t", "convfirst_s"} <= set(cj.list_models())
  with pytest.raises(ValueError, match="unknown model 'convnext_huge'.*convnext_tiny"):
    cj.create_model("convnext_huge")


def test_same_seed_same_model_and_output():
  a = cj.create_model("convnext_atto", num_classes=3, rngs=1)
  b = cj.create_model("convnext_atto", num_classes=3, rngs=1)
  c = cj.create_model("convnext_atto", num_classes=3, rngs=2)
  x = _images()
  np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))
  assert not np.allclose(np.asarray(a(x)), np.asarray(c(x)))


def test_jit_matches_eager():
  model = cj.create_model("convfirst_atto", num_classes=4, rngs=0, zero_init_last=False)
  model.eval()
  x = _images()
  eager = model(x)
  jitted = nnx.jit(lambda m, x: m(x))(model, x)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


def test_batchnorm_train_vs_eval():
  model = cj.create_model("convfirst_atto", num_classes=4, rngs=0, zero_init_last=False)
  x = _images(n=4)
  stem_mean_before = np.asarray(model.stem.bn.mean[...]).copy()
  model.train()
  y_train = model(x)
  # Training mode uses batch statistics and updates the running averages.
  assert not np.allclose(np.asarray(model.stem.bn.mean[...]), stem_mean_before)
  model.eval()
  y_eval1 = model(x)
  y_eval2 = model(x)
  np.testing.assert_array_equal(np.asarray(y_eval1), np.asarray(y_eval2))
  assert not np.allclose(np.asarray(y_train), np.asarray(y_eval1))


def test_drop_path_is_random_in_train_and_off_in_eval():
  model = cj.create_model("convnext_atto", num_classes=4, rngs=0, drop_path_rate=0.5,
                          ls_init_value=1.0)
  x = _images(n=8)
  model.train()
  a, b = model(x), model(x)
  assert not np.allclose(np.asarray(a), np.asarray(b))   # fresh masks each call
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))


def test_drop_path_scales_whole_samples():
  # With rate 0.5 every sample's residual branch is either dropped or scaled by 2.
  block = cj.ConvNeXtBlock(8, drop_path=0.5, ls_init_value=1.0, rngs=nnx.Rngs(0))
  x = _images(n=64, size=5, c=8)
  block.train()
  y = block(x)
  block.eval()
  branch = block(x) - x
  delta = np.asarray(y - x).reshape(64, -1)
  ref = np.asarray(branch).reshape(64, -1)
  dropped = np.all(np.abs(delta) < 1e-6, axis=1)
  kept = np.all(np.isclose(delta, 2 * ref, rtol=1e-4, atol=1e-5), axis=1)
  assert np.all(dropped | kept) and 10 < dropped.sum() < 54


def test_bfloat16_compute_float32_params():
  model = cj.create_model("convnext_atto", num_classes=3, dtype=jnp.bfloat16, rngs=0)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  feats = model.forward_features(_images())
  assert feats.dtype == jnp.bfloat16
  assert model(_images()).dtype == jnp.float32


def test_input_errors_name_expected_and_actual():
  model = cj.create_model("convnext_atto", num_classes=3, rngs=0)
  with pytest.raises(ValueError, match=r"rank 4.*\(32, 32, 3\)"):
    model(jnp.zeros((32, 32, 3)))
  with pytest.raises(ValueError, match="expects 3 input channels.*got 1"):
    model(jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="at least 32.*got 16x64"):
    model(jnp.zeros((1, 16, 64, 3)))
  with pytest.raises(ValueError, match="block implementation must be one of"):
    cj.create_model("convnext_atto", block_impl="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU error")
def test_convfirst_pallas_training_block_off_gpu_fails_loudly():
  # Training-form layers with block_impl="pallas" run Pallas kernels that need a GPU (tests
  # run them in interpret mode: tests/pallas_kernels/test_convfirst_train.py,
  # test_mbconv_train.py): the stem's BatchNorm (the first to run) its reduction kernels,
  # the ConvFirst blocks the Mosaic pointwise kernels, the MBConv blocks the BatchNorm
  # kernels.
  model = cj.create_model("convfirst_atto", num_classes=3, block_impl="pallas", rngs=0)
  with pytest.raises(NotImplementedError, match="batch_norm_act.*backend is 'cpu'"):
    model(_images())
  with pytest.raises(NotImplementedError, match="convfirst_block_train.*backend"):
    model.stages[0].blocks[0](jnp.zeros((2, 8, 8, 32)))
  model = cj.create_model("convfirst_atto", num_classes=3, block_impl="pallas", rngs=0,
                          block_types=("mbconv",) * 4)
  with pytest.raises(NotImplementedError, match="batch_norm_act.*backend is 'cpu'"):
    model.stages[0].blocks[0](jnp.zeros((2, 8, 8, 32)))


def test_hyperparameters_are_constructor_arguments():
  m = cj.create_model("convfirst_atto", num_classes=3, rngs=0, kernel_size=5,
                      expansions=(2, 3, 4, 6), in_chans=1)
  assert m.stages[0].blocks[0].conv_group.kernel.shape == (5, 5, 8, 32)
  assert m.stages[3].blocks[0].fc1.kernel.shape == (256, 256 * 6)
  assert m(jnp.zeros((1, 32, 32, 1))).shape == (1, 3)
  m = ConvNeXt((1, 1), (16, 32), num_classes=2, mlp_ratio=2.0, kernel_size=5,
               rngs=nnx.Rngs(0))
  assert m.stages[1].blocks[0].mlp.fc1.kernel.shape == (32, 64)
  assert m(jnp.zeros((1, 8, 8, 3))).shape == (1, 2)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_patch_conv_matches_nnx_conv(dtype, tol):
  """The stems' PatchConv (a matrix product over 4x4 patches) against nnx.Conv with the same
  parameters: value and the kernel, bias and input gradients; odd patch grid (5 x 7)."""
  from convfirst_jax.layers import PatchConv
  kw = dict(strides=(4, 4), padding="VALID", dtype=dtype, rngs=nnx.Rngs(0))
  patch, conv = PatchConv(3, 16, (4, 4), **kw), nnx.Conv(3, 16, (4, 4), **kw)
  conv.bias[...] = rand.normal(jax.random.key(1), (16,))
  patch.kernel[...], patch.bias[...] = conv.kernel[...], conv.bias[...]
  x = rand.normal(jax.random.key(2), (2, 20, 28, 3), jnp.float32)
  g = rand.normal(jax.random.key(3), (2, 5, 7, 16), jnp.float32)

  def value_and_grads(layer):
    gd, st = nnx.split(layer)
    y, vjp = jax.vjp(lambda s, x: nnx.merge(gd, s)(x).astype(jnp.float32), st, x)
    ds, dx = vjp(g)
    return [y, dx, *jax.tree.leaves(ds)]
  got, want = value_and_grads(patch), value_and_grads(conv)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) < tol
  # configurations it does not cover run nnx.Conv itself (here: a size 4 does not divide)
  y = patch(x[:, :18])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(conv(x[:, :18])))
