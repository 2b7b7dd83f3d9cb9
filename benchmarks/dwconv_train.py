"""Where ConvNeXt's training time goes: the depthwise conv's backward, and faster forms of it.

    PYTHONPATH=. python3 -m benchmarks.dwconv_train [--batch 256] [--train-step] [--json out.json]

For each ConvNeXt-T stage shape (bfloat16 activations, float32 kernel) this times, with XLA
in the same process:

* the 7x7 depthwise conv alone: forward, input gradient, and the weight gradient in every
  formulation of ``pallas_kernels.convnext_block.dwconv`` (max relative error vs XLA's);
* the whole ConvNeXt block (``convnext_block_reference``) forward + backward with each
  weight-gradient formulation;
* with ``--train-step``: ConvNeXt-T's whole training step (``train.throughput``, batch 256,
  224x224) with XLA blocks and XLA's weight gradient, XLA blocks and ``wgrad="auto"`` (the
  default), and ``block_impl=None`` with "auto";
* with ``--grid``: the weight gradient alone at 7x7 and 14x14 for C = 320 ... 1536.

Times: median of ``--iters`` synchronised calls alternating two random input sets.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.convnext_block import dwconv
from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams, convnext_block_reference
from pallas_kernels.timing import median_seconds

STAGES = [(56, 96, 3), (28, 192, 3), (14, 384, 9), (7, 768, 3)]  # (H = W, C, depth)


def _rel(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _block_params(rng, c):
  f = lambda *s, scale=0.02: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
  return ConvNeXtBlockParams(
      dw_kernel=f(7, 7, c, scale=0.1), dw_bias=f(c), ln_scale=1 + f(c), ln_bias=f(c),
      fc1_kernel=f(c, 4 * c), fc1_bias=f(4 * c), fc2_kernel=f(4 * c, c), fc2_bias=f(c),
      gamma=1 + f(c))


def _wgrad_fn(method):
  """jit of (x, w, dy) -> the depthwise kernel's gradient with weight-gradient ``method``."""
  return jax.jit(lambda x, w, g: jax.vjp(
      lambda b: dwconv.depthwise_conv(x, b, wgrad=method), w)[1](g)[0])


def run_shapes(batch, methods, iters):
  rng = np.random.default_rng(0)
  rows = []
  for hw, c, depth in STAGES:
    shape = (batch, hw, hw, c)
    sets = [tuple(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2))
            for _ in range(2)]
    w = jnp.asarray(rng.standard_normal((7, 7, c)) * 0.1, jnp.float32)
    t = lambda f: median_seconds(f, iters=iters, arg_sets=[(x, w, g) for x, g in sets]) * 1e3
    row = {"shape": f"{hw}x{hw}x{c}", "batch": batch, "depth": depth}
    row["fwd_ms"] = t(jax.jit(lambda x, w, g: dwconv.depthwise_conv(x, w)))
    row["dgrad_ms"] = t(jax.jit(
        lambda x, w, g: jax.vjp(lambda a: dwconv.depthwise_conv(a, w), x)[1](g)[0]))
    x0, g0 = sets[0]
    ref_dw = None
    for m in methods:
      fw = _wgrad_fn(m)
      dw = fw(x0, w, g0)
      if ref_dw is None:
        ref_dw = dw
      row[f"wgrad_{m}_ms"] = t(fw)
      row[f"wgrad_{m}_err"] = _rel(dw, ref_dw)
    params = _block_params(rng, c)
    for m in methods:
      fb = jax.jit(lambda x, p, g, m=m: jax.vjp(
          lambda x_, p_: convnext_block_reference(x_, p_, dw_wgrad=m), x, p)[1](g))
      row[f"block_fb_{m}_ms"] = median_seconds(
          fb, iters=iters, arg_sets=[(x, params, g) for x, g in sets]) * 1e3
    row["block_fwd_ms"] = median_seconds(jax.jit(convnext_block_reference), iters=iters,
                                         arg_sets=[(x, params) for x, _ in sets]) * 1e3
    row["best"] = min(methods, key=lambda m: row[f"block_fb_{m}_ms"])
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def run_grid(batches, methods, iters):
  """Weight gradient alone over low-resolution shapes of the ConvNeXt family."""
  rng = np.random.default_rng(1)
  rows = []
  for n in batches:
    for hw in (7, 14):
      for c in (320, 384, 640, 768, 1024, 1536):
        shape = (n, hw, hw, c)
        sets = [(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16),
                 jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)) for _ in range(2)]
        w = jnp.asarray(rng.standard_normal((7, 7, c)) * 0.1, jnp.float32)
        row = {"shape": f"{hw}x{hw}x{c}", "batch": n}
        for m in methods:
          row[f"wgrad_{m}_ms"] = median_seconds(
              _wgrad_fn(m), iters=iters, arg_sets=[(x, w, g) for x, g in sets]) * 1e3
        rows.append(row)
        print(f"grid N={n} {row['shape']}: " + " ".join(
            f"{m} {row[f'wgrad_{m}_ms']:.3f}" for m in methods), flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--methods", default="xla,grouped16,grouped32,grouped64,auto",
                 help=f"comma-separated, from {dwconv.WGRAD_METHODS}; the first is the "
                 "reference for the error column")
  p.add_argument("--train-step", action="store_true")
  p.add_argument("--grid", default="", help="also time the weight gradient alone at 7x7 and "
                 "14x14 for C in 320..1536 at these comma-separated batch sizes")
  p.add_argument("--no-stages", action="store_true", help="skip the ConvNeXt-T stage table")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  methods = a.methods.split(",")
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if a.grid:
    out["grid"] = run_grid([int(b) for b in a.grid.split(",")], methods, a.iters)
  rows = [] if a.no_stages else run_shapes(a.batch, methods, a.iters)
  out["rows"] = rows
  if a.train_step:
    from train import throughput
    steps = {}
    for mode, impl in (("xla", "xla"), ("auto", "xla"), ("auto", None)):
      dwconv.DEFAULT_WGRAD = mode
      name = f"wgrad={mode} block_impl={impl}"
      steps[name] = throughput.measure("convnext_tiny", 256, 224, block_impl=impl, steps=30)
      print(name, json.dumps(steps[name]), flush=True)
    dwconv.DEFAULT_WGRAD = "auto"
    out["train_step"] = steps
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=2)
  # Table last.
  print(f"\nbatch {a.batch}, bf16, ms (median of {a.iters})")
  hdr = ["shape", "fwd", "dgrad"] + [f"wg:{m}" for m in methods] + \
        ["blk fwd"] + [f"blk f+b:{m}" for m in methods]
  print(" | ".join(hdr))
  for r in rows:
    vals = [r["shape"], f"{r['fwd_ms']:.3f}", f"{r['dgrad_ms']:.3f}"] + \
           [f"{r[f'wgrad_{m}_ms']:.3f} ({r[f'wgrad_{m}_err']:.0e})" for m in methods] + \
           [f"{r['block_fwd_ms']:.3f}"] + [f"{r[f'block_fb_{m}_ms']:.3f}" for m in methods]
    print(" | ".join(vals))
  if a.train_step:
    for name, r in out["train_step"].items():
      print(f"ConvNeXt-T train step {name}: {r['img_per_s']:.0f} img/s "
            f"(median {r['median_step_ms']:.1f} ms; back-to-back {r['pipelined_img_per_s']:.0f})")
  return out


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
