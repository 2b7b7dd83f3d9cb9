import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="session")
def _compile_cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_compile_cache")  # one per pytest(-xdist) worker


@pytest.fixture(autouse=True)
def _persistent_compile_cache(_compile_cache_dir):
  """jax's persistent compilation cache during each test of this directory (and only
  then): every ``fit`` jits new train / eval step functions, which jax's in-memory caches
  never reuse, so without it each fit compiles again even when an earlier test here
  compiled the very same program (the same config).  Loading a cached executable gives the
  same program; the previous settings are restored after the test."""
  old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  jax.config.update("jax_compilation_cache_dir", str(_compile_cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # jax decides once whether a cache is used; ask again
  try:
    yield
  finally:
    for name, value in old.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
