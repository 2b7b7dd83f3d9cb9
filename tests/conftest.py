import os

import jax
import pytest
from flax import nnx

# Tests compare float32 results tightly: keep XLA's CPU matmuls in full precision.
jax.config.update("jax_default_matmul_precision", "highest")


# Tests that run whole training processes: started first so that, with pytest-xdist
# (README's command uses two workers), they overlap the many short kernel tests instead of
# forming the tail of the run.
_LONG_FIRST = ("tests/train/test_resume.py", "tests/train/test_sharding.py",
               "tests/train/test_data.py", "tests/train/test_fit.py")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)
  items.sort(key=rank)  # stable: the order within each group is kept
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
