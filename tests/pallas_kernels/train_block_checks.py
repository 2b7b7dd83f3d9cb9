"""Shared checks of the training-form blocks (``convfirst_block_train``,
``mbconv_block_train``) against their forms as written: value, batch statistics and the
gradients of x and every parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def rel(a, b) -> float:
  """Largest absolute difference relative to b's largest magnitude; NaN in a fails."""
  a, b = np.asarray(jnp.asarray(a, F32), np.float64), np.asarray(jnp.asarray(b, F32), np.float64)
  assert not np.isnan(a).any(), "NaN in a result (unwritten or uninitialised)"
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def value_and_grads(block_train, x, params, dps, dy, implementation, interpret=False):
  """(y, stats, dx, dparams) of ``sum(block_train(x, params, dps, ...)[0] * dy)``, jitted."""
  def loss(x, params):
    y, stats = block_train(x, params, dps, implementation=implementation, interpret=interpret)
    return jnp.sum(y.astype(F32) * dy), (y, stats)
  (_, (y, stats)), (gx, gp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                         has_aux=True))(x, params)
  return y, stats, gx, gp


def compare(got, want, tol, zero_grad_fields=(), baseline=None):
  """Every output of ``value_and_grads`` within ``tol`` (``rel``); parameter gradients
  that are zero in exact arithmetic (``zero_grad_fields``: rounding noise on both sides)
  are compared to the scale of the other parameters' gradients instead.

  ``baseline``: the same outputs from XLA's block in the dtype under test; each output may
  then be off by up to 1.25x XLA's own error where that exceeds ``tol``.  A bfloat16 block
  on a handful of pixels has BatchNorm statistics of a few samples, and its gradients can
  be off by more than 2% wherever they are computed (MBConv, C=512, 2x1x3 pixels: XLA's
  bfloat16 conv-kernel gradient 3.0% from the float32 one, the kernels' 2.2%; 2026-11-28)."""
  leaves = lambda r: [r[0], *jax.tree.leaves(r[1]), r[2], *r[3]]
  grads = [f"d{f}" for f in want[3]._fields]
  names = ["y", *(f"stats[{i}]" for i in range(len(jax.tree.leaves(want[1])))), "dx", *grads]
  limits = [tol] * len(names)
  if baseline is not None:
    limits = [max(tol, 1.25 * rel(c, b)) for c, b in zip(leaves(baseline), leaves(want))]
  zero = {f"d{f}" for f in zero_grad_fields}
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want[3]))
  for name, a, b, limit in zip(names, leaves(got), leaves(want), limits):
    assert a.shape == b.shape, name
    assert name not in grads or a.dtype == b.dtype, name
    if name in zero:
      assert float(jnp.abs(a - b).max()) < limit * scale, name
    else:
      assert rel(a, b) < limit, (name, rel(a, b), limit)


def compare_layer_runs(got, want, n_stats):
  """A training-mode layer run two ways, each (output, parameter gradients, BatchNorm
  statistics after the gradient call and one more call): outputs within 1e-4, gradients
  within 1e-4 of the larger of 1 and their magnitude, ``n_stats`` running averages equal
  to 1e-4 and moved away from their initial values (means 0, variances 1)."""
  (y, g, st), (y0, g0, st0) = got, want
  assert rel(y, y0) < 1e-4
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
    assert a.shape == b.shape
    assert float(jnp.abs(a - b).max()) < 1e-4 * max(float(jnp.abs(b).max()), 1.0)
  leaves, leaves0 = jax.tree.leaves(st), jax.tree.leaves(st0)
  assert len(leaves) == len(leaves0) == n_stats
  for a, b in zip(leaves, leaves0):  # updated twice (grad, then the call), identically
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert all(not (np.allclose(a, 0.0) or np.allclose(a, 1.0)) for a in leaves)
