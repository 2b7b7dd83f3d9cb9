"""pallas_kernels.layernorm: the channel LayerNorm kernels (interpret mode) vs the jnp
reference and jax.grad of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import layernorm as ln
from tests import rand


def _inputs(shape, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = (rand.normal(k[0], shape) * 3 + 1.5).astype(dtype)
  scale = 1 + 0.3 * rand.normal(k[1], (c,))
  bias = 0.2 * rand.normal(k[2], (c,))
  dy = rand.normal(k[3], shape).astype(dtype)
  return x, scale, bias, dy


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ConvNeXt's stem / downsampling widths (atto's 40 pads to 64 lanes), odd row counts.
@pytest.mark.parametrize("shape", [(3, 7, 9, 96), (1, 5, 3, 40), (2, 3, 5, 192), (1, 3, 3, 384),
                                   (2, 9, 1, 24)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_forward_and_gradients_match_reference(shape, dtype, tol):
  x, scale, bias, dy = _inputs(shape, dtype)
  f = lambda x, s, b: ln.layer_norm(x, s, b, implementation="pallas", interpret=True)
  ref = lambda x, s, b: ln.layer_norm_reference(x, s, b)
  y, vjp = jax.vjp(f, x, scale, bias)
  y_ref, vjp_ref = jax.vjp(ref, x, scale, bias)
  assert y.dtype == dtype and y.shape == shape
  # Against the float32 reference on the same (rounded) inputs.
  y32 = ln.layer_norm_reference(x.astype(jnp.float32), scale, bias)
  assert _rel(y, y32) < tol
  grads, grads_ref = vjp(dy), vjp_ref(dy)
  for g, gr in zip(grads, grads_ref):
    assert g.shape == gr.shape and g.dtype == gr.dtype
    assert _rel(g, gr) < (tol if dtype == jnp.float32 else 2e-2)
  # And jax.grad of the float32 reference for the parameters (float32 in, float32 out).
  if dtype == jnp.float32:
    loss = lambda fn: lambda s, b: jnp.sum(fn(x, s, b) * dy)
    for g, gr in zip(jax.grad(loss(f), (0, 1))(scale, bias),
                     jax.grad(loss(ref), (0, 1))(scale, bias)):
      assert _rel(g, gr) < 1e-5


def test_output_dtype_and_unwritten_rows():
  """bf16 out from float32 in; every element written (element by element against the
  reference, whose values are far from zero: an element the kernel skipped would differ)."""
  x, scale, bias, _ = _inputs((2, 11, 3, 96), jnp.float32, seed=3)
  y = ln.layer_norm(x, scale, bias, out_dtype=jnp.bfloat16, implementation="pallas",
                    interpret=True)
  assert y.dtype == jnp.bfloat16
  ref = ln.layer_norm_reference(x, scale, bias, out_dtype=jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-2, atol=1e-2)


def test_errors_and_dispatch():
  x, scale, bias, _ = _inputs((2, 3, 3, 96), jnp.float32)
  with pytest.raises(ValueError, match=r"scale and bias must be \(96,\)"):
    ln.layer_norm(x, scale[:5], bias)
  with pytest.raises(ValueError, match="implementation"):
    ln.layer_norm(x, scale, bias, implementation="cuda")
  with pytest.raises(ValueError, match="at most 2048 channels"):
    big = jnp.zeros((2, 4096), jnp.float32)
    ln.layer_norm(big, jnp.ones(4096), jnp.zeros(4096), implementation="pallas")
  with pytest.raises(ValueError, match="chunks"):
    ln.layer_norm(jnp.zeros((2, 99)), jnp.ones(99), jnp.zeros(99), implementation="pallas")
  with pytest.raises(ValueError, match="float32/bfloat16"):
    ln.layer_norm(x.astype(jnp.int32), scale, bias, implementation="pallas")
  # None on a CPU backend (or few rows) is the reference, exactly.
  if jax.default_backend() != "gpu":
    np.testing.assert_array_equal(np.asarray(ln.layer_norm(x, scale, bias, implementation=None)),
                                  np.asarray(ln.layer_norm_reference(x, scale, bias)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 57, 55, 96), (2, 28, 29, 192), (1, 7, 7, 384)])
def test_compiled_kernels_on_gpu(shape):
  """Compiled (not interpreted): forward vs the float32 reference, gradients vs jax.vjp of
  the reference, bf16, odd row counts."""
  x, scale, bias, dy = _inputs(shape, jnp.bfloat16, seed=5)
  f = lambda x, s, b: ln.layer_norm(x, s, b, implementation="pallas")
  y, vjp = jax.vjp(f, x, scale, bias)
  assert _rel(y, ln.layer_norm_reference(x.astype(jnp.float32), scale, bias)) < 1e-2
  _, vjp_ref = jax.vjp(lambda x, s, b: ln.layer_norm_reference(x.astype(jnp.float32), s, b),
                       x, scale, bias)
  for g, gr in zip(vjp(dy), vjp_ref(dy.astype(jnp.float32))):
    assert _rel(g, gr) < 2e-2


def test_channel_layer_norm_module_matches_nnx_layer_norm():
  """convfirst_jax.layers.ChannelLayerNorm (ConvNeXt's stem / downsampling LN): the same
  parameters as nnx.LayerNorm, and through the kernels (interpreted) the same output and
  gradients; with implementation="xla" exactly nnx.LayerNorm's computation."""
  from flax import nnx

  from convfirst_jax.layers import ChannelLayerNorm
  x, _, _, dy = _inputs((2, 48, 45, 96), jnp.float32, seed=7)   # 4,320 rows >= MIN_ROWS
  ref = nnx.LayerNorm(96, epsilon=1e-6, rngs=nnx.Rngs(0))
  ref.scale[...] = 1 + 0.1 * jnp.arange(96) / 96
  ref.bias[...] = 0.05 * jnp.arange(96) / 96
  ours = ChannelLayerNorm(96, epsilon=1e-6, interpret=True, rngs=nnx.Rngs(0))
  xla = ChannelLayerNorm(96, epsilon=1e-6, implementation="xla", rngs=nnx.Rngs(0))
  for m in (ours, xla):
    m.scale[...], m.bias[...] = ref.scale[...], ref.bias[...]
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))

  def grads(m):
    return nnx.grad(lambda m, x: jnp.sum(m(x) * dy), argnums=(0, 1))(m, x)
  np.testing.assert_array_equal(np.asarray(xla(x)), np.asarray(ref(x)))
  assert _rel(ours(x), ref(x)) < 2e-6
  (gm_o, gx_o), (gm_r, gx_r) = grads(ours), grads(ref)
  assert _rel(gx_o, gx_r) < 1e-5
  assert _rel(gm_o.scale[...], gm_r.scale[...]) < 1e-5
  assert _rel(gm_o.bias[...], gm_r.bias[...]) < 1e-5
