"""Random test inputs without an XLA program per shape.

On XLA:CPU every eager jax op compiles a program per shape and dtype (~15-30 ms each;
``jax.random.normal`` ~0.1 s with its lowering), and the kernel tests draw inputs and
parameters of hundreds of distinct shapes and scale or round them eagerly: in a profiled
run of the kernel tests (2026-11-28) 748 ``jax.random.normal`` programs took 72 s of
~1,350 worker-seconds, and eager multiply / add / astype programs (from these inputs and
from the references) ~100 s more.  ``normal`` takes ``jax.random.normal``'s arguments and gives the
same distribution from one compiled program of a fixed size (run once per 2^16 values,
the key folded with the chunk index), and returns a numpy array, so that scaling and
rounding it (``0.1 * normal(k, s)``, ``.astype(jnp.bfloat16)``) stays in numpy; jax
functions take it as they take any array.  The values differ from ``jax.random.normal``'s
for the same key; the tests need only standard normal values fixed by the key.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_CHUNK = 1 << 16


@jax.jit
def _chunk(key, index):
  return jax.random.normal(jax.random.fold_in(key, index), (_CHUNK,), jnp.float32)


def normal(key, shape=(), dtype=jnp.float32) -> np.ndarray:
  """Standard normal samples of ``shape``, drawn in float32 and rounded to ``dtype`` (as
  ``jax.random.normal(key, shape, jnp.float32).astype(dtype)``), as a numpy array fixed by
  ``key``.  Eager only: ``key`` must be a concrete jax key, not a tracer."""
  shape = tuple(shape)
  n = math.prod(shape)
  parts = [np.asarray(_chunk(key, i)) for i in range(-(-n // _CHUNK))]
  flat = np.concatenate(parts)[:n] if parts else np.zeros(0, np.float32)
  return flat.reshape(shape).astype(jnp.dtype(dtype))
