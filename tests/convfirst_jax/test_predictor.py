"""convfirst_jax.TreePacker and predictor: weights passed to jitted calls as flat buffers."""

import jax
import jax.numpy as jnp
import numpy as np

import convfirst_jax as cj
from tests import rand

TINY = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


def test_tree_packer_groups_dtypes_and_aligns():
  tree = {"a": jnp.arange(5, dtype=jnp.float32), "b": jnp.ones((3, 7), jnp.bfloat16),
          "c": {"d": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + 10,
                "k": jax.random.key(3)},
          "e": jnp.array(4, jnp.int32)}
  packer = cj.TreePacker(tree)
  packed = packer.pack(tree)
  assert set(packed) == {"float32", "bfloat16", "int32", "loose"}
  # "d" starts at the next multiple of 256 elements after "a" (so a view stays 256-byte
  # aligned even in a bfloat16 copy of the buffer).
  assert [s[1] for s in packer.slots if s[0] == "float32"] == [0, 256]
  assert packed["float32"].shape == (256 + 6,)
  back = jax.jit(packer.unpack)(packed)
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert x.dtype == y.dtype and x.shape == y.shape
    if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(jax.random.key_data(back["c"]["k"]),
                                jax.random.key_data(tree["c"]["k"]))


def test_predictor_matches_the_model():
  # Against the same computation jitted with the module as argument (eager differs in the
  # last float32 bits: another fusion of the same ops).
  run = jax.jit(lambda m, x: m(x))
  model = cj.create_model("convnext_atto", num_classes=10, rngs=0, **TINY)
  model.eval()
  x = rand.normal(jax.random.key(1), (2, 32, 32, 3))
  np.testing.assert_array_equal(np.asarray(cj.predictor(model)(x)), np.asarray(run(model, x)))
  net = cj.create_model("convfirst_atto", num_classes=10, rngs=0)
  net.eval()
  folded = cj.fold_batchnorm(net)
  x = rand.normal(jax.random.key(2), (1, 64, 64, 3))
  np.testing.assert_array_equal(np.asarray(cj.predictor(folded)(x)),
                                np.asarray(run(folded, x)))


def test_predictor_with_a_mesh():
  """mesh=: the same logits (two devices: tests/pallas_kernels/test_batch_sharding.py)."""
  model = cj.create_model("convnext_atto", num_classes=10, rngs=0, **TINY)
  model.eval()
  x = rand.normal(jax.random.key(1), (2, 32, 32, 3))
  mesh = jax.make_mesh((1,), ("data",))
  np.testing.assert_array_equal(np.asarray(cj.predictor(model, mesh)(x)),
                                np.asarray(cj.predictor(model)(x)))
