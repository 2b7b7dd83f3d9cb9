"""The kernel-choice switches are part of the jitted entry points' cache keys: changing
one between two calls in a process runs the other kernel (a plain ``jax.jit`` kept
returning the program traced first, which made a one-process comparison time a program
against itself)."""

import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels import _switches, mosaic_gemm, mosaic_split


def test_every_switch_exists():
  for module, name in _switches.SWITCHES:
    assert hasattr(importlib.import_module(module), name), (module, name)
  assert None not in _switches.values()


def test_a_changed_switch_retraces(monkeypatch):
  @_switches.jit(static_argnames=("k",))
  def f(x, *, k):
    return x * k + (1.0 if mosaic_gemm.PERSISTENT else 2.0)

  x = jnp.ones((3,))
  assert float(f(x, k=2)[0]) == (3.0 if mosaic_gemm.PERSISTENT else 4.0)
  monkeypatch.setattr(mosaic_gemm, "PERSISTENT", not mosaic_gemm.PERSISTENT)
  assert float(f(x, k=2)[0]) == (3.0 if mosaic_gemm.PERSISTENT else 4.0)
  assert f.__name__ == "f" and "k" in f.__wrapped__.__code__.co_varnames


def test_split_mlp_follows_the_persistent_switch(monkeypatch):
  """``split_mlp`` (a jitted entry point) traced again with the other GEMM kernel form."""
  seen = []
  real = mosaic_gemm._call
  monkeypatch.setattr(mosaic_gemm, "_call",
                      lambda *a, **k: seen.append(k["persistent"]) or real(*a, **k))
  s = jax.ShapeDtypeStruct
  m, c, e = 128, 64, 256
  args = (s((m, c), jnp.bfloat16), s((m, c), jnp.bfloat16), s((c, e), jnp.float32),
          s((e,), jnp.float32), s((e, c), jnp.float32), s((c,), jnp.float32))
  for persistent in (True, False, True):
    monkeypatch.setattr(mosaic_gemm, "PERSISTENT", persistent)
    # a new outer function each time, as a benchmark's variants are (jax.eval_shape
    # caches its own trace of one function object)
    jax.eval_shape(functools.partial(mosaic_split.split_mlp, expand_gemm=True,
                                     project_gemm=True, interpret=True), *args)
  assert seen == [True, True, False, False]  # the third call: the first trace, cached
