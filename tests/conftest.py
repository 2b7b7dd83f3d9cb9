import os
from importlib import metadata


def _cpu_only_jax():
  """No GPU plugin of jax installed (CI, README's CPU install) or JAX_PLATFORMS=cpu."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return True
  names = (d.metadata["Name"] or "" for d in metadata.distributions())
  return not any(n.lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm"))
                 for n in names)


# On CPU the suite is compile-bound: with its tiny shapes ~75% of a kernel or training
# test's time is XLA:CPU compiling (the Pallas interpreter's kernels are ~1 MB of HLO, each
# model initialiser is a program of its own), not running.  LLVM optimisation level 0
# compiles those ~1.5-2x faster.  It changes how XLA:CPU generates machine code for the
# same HLO, not what the programs compute (no fast-math either way), and no assertion or
# tolerance changes; results may differ in the last bits, as between two CPUs.  Set before jax creates its CPU client, which reads
# XLA_FLAGS once; inherited by the python processes the tests start (tests/train), so the
# runs compared bit for bit there are compiled alike (test_sharding.py and
# test_batch_sharding.py replace XLA_FLAGS to force host devices, and set level 0 again).
# Not on GPU machines, whose kernels we want compiled as they run for real; XLA_FLAGS the
# caller sets are kept (and can override it: the last occurrence of a flag wins).
if _cpu_only_jax():
  os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                             + os.environ.get("XLA_FLAGS", "")).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

# Tests compare float32 results tightly: keep XLA's CPU matmuls in full precision.
jax.config.update("jax_default_matmul_precision", "highest")
# XLA:CPU runs each computation before the call returns (no asynchronous dispatch): the
# Mosaic GPU interpreter's multi-warpgroup kernels start computations from host threads
# inside the running kernel and deadlocked against eager ops dispatched meanwhile (a CI run
# hung; reproduced within two calls of the C=192 training-path test, and gone with this --
# see pallas_kernels/mosaic_mlp._warn_if_async_cpu_dispatch).  Set before jax creates its
# CPU client, which reads it once.
jax.config.update("jax_cpu_enable_async_dispatch", False)


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
