"""BatchNorm folding: the inference form computes the same function as eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convfirst_jax as cj
from convfirst_jax.convfirst import FoldedConvFirstBlock, FoldedMBConvBlock
from tests import rand


@pytest.mark.parametrize("name,kernel_size", [("convfirst_atto", 3), ("convfirst_atto", 5)])
def test_folded_matches_eval_mode(name, kernel_size, randomise_batchnorm):
  model = cj.create_model(name, num_classes=10, rngs=0, kernel_size=kernel_size)
  randomise_batchnorm(model)
  model.eval()
  folded = cj.fold_batchnorm(model)
  x = rand.normal(jax.random.key(1), (2, 35, 33, 3))
  ref = np.asarray(model(x))
  out = np.asarray(folded(x))
  assert np.abs(ref).max() > 1e-2   # not a trivially small output
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  # Inference form: no BatchNorm left, blocks are the folded kinds.
  assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(folded))
  kinds = {type(b) for s in folded.stages for b in s.blocks}
  assert kinds == {FoldedConvFirstBlock, FoldedMBConvBlock}


def test_fold_does_not_modify_input_and_respects_overrides():
  model = cj.create_model("convfirst_atto", num_classes=3, rngs=0)
  before = jax.tree.map(np.asarray, nnx.state(model))
  folded = cj.fold_batchnorm(model, block_impl="xla", dtype=jnp.bfloat16)
  after = jax.tree.map(np.asarray, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert folded.block_impl == "xla" and folded.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="already folded"):
    cj.fold_batchnorm(folded)
  with pytest.raises(TypeError, match="expects a ConvFirstNet"):
    cj.fold_batchnorm(cj.create_model("convnext_atto", rngs=0))
