import os

import jax
import pytest

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
