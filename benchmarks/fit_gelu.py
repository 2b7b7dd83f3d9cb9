"""Fit the polynomial behind the Mosaic kernels' GELU (``pallas_kernels.mosaic_mlp._gelu``).

GELU(x) = x Phi(x) = x sigmoid(g(x)), g = logit(Phi) = log Phi(x) - log Phi(-x), odd.  With
g(x) ~ x P(x^2) the kernel needs one exp2 and one reciprocal per element and no erf.  The
fit minimises max |x Phi(x) (1 - Phi(x)) (x P(x^2) - g(x))| / max(1, |x|) on [0, R] -- the
GELU's absolute error (relative beyond |x| = 1) caused by an error in g -- as a linear
program (scipy's HiGHS), then checks the float32 form on [-40, 40] and that g stays
positive and increasing on (0, 1e6) (so exp2 saturates to the right limits: x and 0).

    python -m benchmarks.fit_gelu [--degree 7] [--range 6]

prints the coefficients of P (lowest first) and the float32 errors.  Needs scipy (installed
with jax).
"""

from __future__ import annotations

import argparse

import numpy as np


def logit_cdf(x):
  from scipy.special import log_ndtr
  return log_ndtr(x) - log_ndtr(-x)


def fit(terms: int, upper: float, points: int = 4001) -> tuple[np.ndarray, float]:
  """(coefficients of P, lowest first; the minimised weighted error)."""
  from scipy.optimize import linprog
  from scipy.special import ndtr
  xs = np.linspace(1e-4, upper, points)
  target = logit_cdf(xs)
  scale = 1e5  # keeps the weighted errors above HiGHS's feasibility tolerance
  w = scale * xs * ndtr(xs) * ndtr(-xs) / np.maximum(1.0, xs)
  a = np.stack([xs ** (2 * k + 1) for k in range(terms)], 1)
  n = len(xs)
  ones = np.ones((n, 1))
  a_ub = np.vstack([np.hstack([w[:, None] * a, -ones]), np.hstack([-w[:, None] * a, -ones])])
  b_ub = np.concatenate([w * target, -w * target])
  res = linprog(np.r_[np.zeros(terms), 1.0], A_ub=a_ub, b_ub=b_ub,
                bounds=[(None, None)] * terms + [(0, None)], method="highs")
  if not res.success:
    raise RuntimeError(f"linprog failed: {res.message}")
  return res.x[:terms], res.x[terms] / scale


def gelu_float32(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
  """The kernel's evaluation order in float32 (exact exp2 / rsqrt)."""
  x = x.astype(np.float32)
  q32 = (-np.asarray(coef) / np.log(2.0)).astype(np.float32)
  t = x * x
  q = np.full_like(x, q32[-1])
  with np.errstate(over="ignore", invalid="ignore"):
    for c in q32[-2::-1]:
      q = q * t + c
    r = (1.0 / np.sqrt(np.float32(1.0) + np.exp2(q * x))).astype(np.float32)
  return x * r * r


def main(argv=None):
  from scipy.special import ndtr
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--degree", type=int, default=7, help="terms of P (odd degree 2n-1 in x)")
  p.add_argument("--range", type=float, default=6.0, help="fit on [0, RANGE]")
  args = p.parse_args(argv)
  coef, err = fit(args.degree, args.range)
  x = np.linspace(-40, 40, 4_000_001)
  ref = x * ndtr(x)
  e = np.abs(gelu_float32(x, coef) - ref)
  big = np.logspace(-3, 6, 200_001)
  g = sum(c * big ** (2 * k + 1) for k, c in enumerate(coef))
  print("P coefficients (lowest first):", repr(coef.tolist()))
  print(f"fit error (weighted, float64): {err:.3g}")
  print(f"float32 on [-40, 40]: max abs {e.max():.3g}, "
        f"max abs / max(1, |x|) {(e / np.maximum(1, np.abs(x))).max():.3g}")
  print(f"g > 0 and increasing on (1e-3, 1e6): {bool(np.all(g > 0) and np.all(np.diff(g) > 0))}")


if __name__ == "__main__":
  main()
