"""engine.StatePacker: the TrainState as a few flat buffers between jitted steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import engine

from tests.train.helpers import TINY


def _raw(x):
  return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                    else x)


@pytest.fixture(scope="module")
def setup():
  net = engine.build_model("convnext_atto", 10, dtype="float32", drop_path=0.1, **TINY)
  split = engine.SplitModel.from_model(net)
  tx, _ = engine.make_optimizer(split.params, lr=1e-3, total_steps=100, warmup_steps=10,
                                weight_decay=0.05, grad_clip=1.0)
  state = engine.init_state(split, tx, ema=True)
  # Distinct values everywhere, so a leaf unpacked from the wrong offset cannot pass.
  leaves, treedef = jax.tree.flatten(state)
  leaves = [x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            else (jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) + i).astype(x.dtype)
            for i, x in enumerate(leaves)]
  return split, tx, jax.tree.unflatten(treedef, leaves)


def test_pack_unpack_round_trip(setup):
  _, _, state = setup
  packer = engine.StatePacker(state)
  packed = jax.jit(packer.pack)(state)
  n_leaves = len(jax.tree.leaves(state))
  assert packer.num_leaves == n_leaves > 200
  # float32 (parameters, moments, EMA), int32 (step, counts), uint32 (RNG counters) and
  # the typed keys: a handful of arrays instead of hundreds.
  assert len(jax.tree.leaves(packed)) <= 8
  assert packed["float32"].shape == (packer.sizes["float32"],)
  for group, offset, _ in packer.slots:  # every leaf 256-element aligned: 256-byte aligned
    if group is not None:                 # custom-call inputs, also in a converted copy
      assert offset % 256 == 0
  back = jax.jit(packer.unpack)(packed)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(_raw(a), _raw(b))


def test_pack_rejects_another_layout(setup):
  _, _, state = setup
  packer = engine.StatePacker(state)
  with pytest.raises(ValueError, match="does not match the packer's layout"):
    packer.pack({k: v for k, v in state.items() if k != "ema"})
  bad = jax.tree.map(lambda x: x, state)
  bad["step"] = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="shape"):
    packer.pack(bad)


def test_packed_step_matches_the_tree_step(setup):
  split, tx, _ = setup
  state = engine.init_state(split, tx, ema=True)
  kw = dict(num_classes=10, label_smoothing=0.1, ema_decay=0.99)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, 4).astype(np.int32))
  tree_step = jax.jit(engine.make_train_step(split, tx, **kw))
  packer = engine.StatePacker(state)
  packed_step = jax.jit(engine.make_packed_train_step(packer, split, tx, **kw))
  t, p = state, jax.jit(packer.pack)(state)
  for _ in range(2):
    t, mt = tree_step(t, images, labels)
    p, mp = packed_step(p, images, labels)
  got = packer.unpack(p)
  for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(got)):
    np.testing.assert_allclose(_raw(b), _raw(a), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(mp["loss"]), float(mt["loss"]), rtol=1e-6)
  assert int(got["step"]) == 2
  # The eval step over the packed state reads the same weights (and the EMA ones).
  mask = jnp.ones((4,), jnp.float32)
  ev = jax.jit(engine.make_eval_step(split, num_classes=10))
  for ema in (False, True):
    w = t["ema"] if ema else t
    want = ev(w["params"], w["batch_stats"], t["rest"], images, labels, mask)
    have = jax.jit(engine.make_packed_eval_step(packer, split, ema=ema, num_classes=10))(
        p, images, labels, mask)
    np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=1e-6)
