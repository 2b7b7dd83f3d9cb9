import os

import jax
import pytest
from flax import nnx

# Tests compare float32 results tightly: keep XLA's CPU matmuls in full precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  on_gpu = jax.default_backend() == "gpu"
  run_slow = os.environ.get("RUN_SLOW") == "1"
  skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
  skip_slow = pytest.mark.skip(reason="slow; set RUN_SLOW=1 to run")
  for item in items:
    if "gpu" in item.keywords and not on_gpu:
      item.add_marker(skip_gpu)
    if "slow" in item.keywords and not run_slow:
      item.add_marker(skip_slow)


def _randomise_batchnorm(model, seed=0):
  """Non-trivial BatchNorm statistics and affine parameters, as after training."""
  keys = iter(jax.random.split(jax.random.key(seed), 10_000))
  for _, bn in nnx.iter_graph(model):
    if isinstance(bn, nnx.BatchNorm):
      c = bn.scale.shape
      bn.scale[...] = jax.random.uniform(next(keys), c, minval=0.5, maxval=1.5)
      bn.bias[...] = 0.1 * jax.random.normal(next(keys), c)
      bn.mean[...] = 0.1 * jax.random.normal(next(keys), c)
      bn.var[...] = jax.random.uniform(next(keys), c, minval=0.5, maxval=2.0)


@pytest.fixture
def randomise_batchnorm():
  return _randomise_batchnorm
