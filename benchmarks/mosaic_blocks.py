"""Mosaic GPU fused pointwise kernels (``pallas_kernels.mosaic_mlp``) vs XLA, on the GPU.

    PYTHONPATH=. python3 -m benchmarks.mosaic_blocks [--batch 128] [--json out.json]

For the ConvNeXt-T stage shapes the kernel supports (C <= 256) and the reference ConvFirst
inference shapes, bfloat16, this times in one process: XLA's whole block forward
(``convnext_block_reference`` / ``convfirst_block_reference``), the XLA conv alone, and the
Mosaic block forward (XLA conv + one fused kernel) for each kernel variant (hidden chunk,
pipeline stages, hidden chunk through registers or shared memory).  Every variant's output is
checked first against the float32 reference of the block on the same bf16 input
(max |y - ref| / max |ref|) and against XLA's bf16 block.  Times: median of ``--iters``
samples of ``--reps`` back-to-back calls alternating two random inputs, synchronised.
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ceilings as ceilings_mod
from pallas_kernels.timing import median_seconds


def _time(fn, arg_sets, iters, reps):
  """Milliseconds per call: median of ``iters`` samples of ``reps`` back-to-back calls."""
  return median_seconds(fn, arg_sets=arg_sets, warmup=len(arg_sets), iters=iters,
                        reps=reps) * 1e3


def _rel(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _convnext_case(rng, batch, hw, c):
  from pallas_kernels.convnext_block import mosaic
  from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams, convnext_block_reference
  f = lambda *s, scale: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
  p = ConvNeXtBlockParams(
      dw_kernel=f(7, 7, c, scale=0.1), dw_bias=f(c, scale=0.1), ln_scale=1 + f(c, scale=0.1),
      ln_bias=f(c, scale=0.1), fc1_kernel=f(c, 4 * c, scale=c ** -0.5),
      fc1_bias=f(4 * c, scale=0.1), fc2_kernel=f(4 * c, c, scale=(4 * c) ** -0.5),
      fc2_bias=f(c, scale=0.1), gamma=1 + f(c, scale=0.1))
  from pallas_kernels.convnext_block import dwconv
  xla = jax.jit(lambda x: convnext_block_reference(x, p))
  ref32 = jax.jit(lambda x: convnext_block_reference(x.astype(jnp.float32), p))
  conv = jax.jit(lambda x: dwconv.depthwise_conv(x, p.dw_kernel, wgrad="xla"))
  make = lambda **kw: jax.jit(lambda x: mosaic.forward(x, p, **kw))
  reason = mosaic.unsupported_reason((batch, hw, hw, c), p, jnp.bfloat16)
  import dataclasses
  from pallas_kernels.convnext_block import api, tuning
  tiles = dataclasses.replace(tuning.get_tiles(c, jnp.bfloat16), fwd_kernel="triton")
  triton = jax.jit(lambda x: api.convnext_block(x, p, implementation="pallas", tiles=tiles))
  m = batch * hw * hw
  flops = 2 * 2 * m * c * 4 * c + 2 * 49 * m * c
  bytes_ = 2 * m * c * 2
  from pallas_kernels import mosaic_mlp
  w1, b1, w2, b2 = mosaic.fold_params(p)
  t = tuning.get_tiles(c, jnp.bfloat16)
  def kernel_only(**kw):  # the fused kernel alone on a precomputed conv output
    kw = dict(dict(hidden_chunk=t.mosaic_hidden, stages=t.mosaic_stages,
                   block_m=t.mosaic_block_m), **kw)
    return jax.jit(lambda z, x: mosaic_mlp.fused_mlp(
        z.reshape(-1, c), x.reshape(-1, c), w1, b1, w2, b2, z_bias=p.dw_bias, **kw))
  diagnostics = {"kernel alone": kernel_only(),
                 "kernel, identity activation": kernel_only(act="identity"),
                 "kernel, tanh GELU": kernel_only(act="gelu_tanh"),
                 "kernel, no LN": kernel_only(normalize=False)}
  return dict(name=f"ConvNeXt {hw}x{hw}x{c}", shape=(batch, hw, hw, c), xla=xla, ref32=ref32,
              diagnostics=diagnostics,
              conv=conv, make=make, reason=reason, flops=flops,
              bytes=bytes_, triton=triton)


def _convfirst_case(rng, batch, hw, c, e, k=3):
  from pallas_kernels.convfirst_block import api, mosaic
  from pallas_kernels.convfirst_block.reference import (ConvFirstBlockParams,
                                                        convfirst_block_reference, grouped_conv)
  f = lambda *s, scale: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
  p = ConvFirstBlockParams(
      conv_kernel=f(k, k, 8, c, scale=(k * k * 8) ** -0.5), conv_bias=f(c, scale=0.1),
      fc1_kernel=f(c, e * c, scale=c ** -0.5), fc1_bias=f(e * c, scale=0.1),
      fc2_kernel=f(e * c, c, scale=(e * c) ** -0.5), fc2_bias=f(c, scale=0.1))
  xla = jax.jit(lambda x: convfirst_block_reference(x, p))
  ref32 = jax.jit(lambda x: convfirst_block_reference(x.astype(jnp.float32), p))
  conv = jax.jit(lambda x: grouped_conv(x, p.conv_kernel))
  make = lambda **kw: jax.jit(lambda x: mosaic.forward(x, p, **kw))
  reason = mosaic.unsupported_reason((batch, hw, hw, c), p, jnp.bfloat16)
  triton = jax.jit(lambda x: api.convfirst_block(x, p, implementation="pallas",
                                                 forward_kernel="triton"))
  m = batch * hw * hw
  flops = 2 * 2 * m * c * e * c + 2 * k * k * 8 * m * c
  bytes_ = 2 * m * c * 2
  return dict(name=f"ConvFirst {hw}x{hw}x{c} E{e}", shape=(batch, hw, hw, c), xla=xla,
              ref32=ref32, conv=conv, make=make, reason=reason, flops=flops, bytes=bytes_,
              triton=triton)


VARIANTS = [  # block_m=128: two compute warpgroups + a TMA warpgroup (mosaic_mlp._kernel_ws)
    dict(hidden_chunk=64, stages=2, block_m=64),
    dict(hidden_chunk=64, stages=3, block_m=64),
    dict(hidden_chunk=64, stages=2, block_m=128),
    dict(hidden_chunk=64, stages=3, block_m=128),
    dict(hidden_chunk=64, stages=4, block_m=128),
    dict(hidden_chunk=128, stages=2, block_m=128),
]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--json", default=None)
  ap.add_argument("--cases", default="convnext,convfirst")
  ap.add_argument("--no-triton", dest="triton", action="store_false",
                  help="skip the Pallas-Triton kernels (slow to compile)")
  ceilings_mod.add_argument(ap)
  args = ap.parse_args(argv)
  ceil = ceilings_mod.resolve(args.ceilings)
  rng = np.random.default_rng(0)
  b = args.batch
  cases = []
  if "convnext" in args.cases:
    cases += [_convnext_case(rng, b, hw, c) for hw, c in [(56, 96), (28, 192), (14, 384), (7, 768)]]
  if "convfirst" in args.cases:
    cases += [_convfirst_case(rng, b, 56, 64, 4), _convfirst_case(rng, b, 64, 64, 6)]
  dev = jax.devices()[0].device_kind
  print(f"device {dev}, jax {jax.__version__}, batch {b}, bf16, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {ceil.describe()}",
        flush=True)
  rows = []
  for case in cases:
    xs = [jnp.asarray(rng.standard_normal(case["shape"]), jnp.bfloat16) for _ in range(2)]
    sets = [(x,) for x in xs]
    row = dict(block=case["name"], shape=case["shape"],
               floor_ms=ceil.floor_s(case["flops"], case["bytes"]) * 1e3)
    row["xla_ms"] = _time(case["xla"], sets, args.iters, args.reps)
    row["conv_ms"] = _time(case["conv"], sets, args.iters, args.reps)
    if args.triton:
      try:
        row["triton_err_vs_f32"] = _rel(case["triton"](xs[0]), np.asarray(case["ref32"](xs[0])))
        row["triton_ms"] = _time(case["triton"], sets, args.iters, args.reps)
      except Exception as exc:
        row["triton_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(f"{case['name']}: XLA {row['xla_ms']:.3f} ms, conv {row['conv_ms']:.3f} ms, "
          f"Triton {row.get('triton_ms', float('nan')):.3f} ms", flush=True)
    ref = np.asarray(case["ref32"](xs[0]))
    y_xla = np.asarray(case["xla"](xs[0]))
    row["xla_err_vs_f32"] = _rel(y_xla, ref)
    row["variants"] = []
    if case["reason"]:
      row["skipped"] = case["reason"]
      print(f"{case['name']}: XLA {row['xla_ms']:.3f} ms; Mosaic skipped: {case['reason']}",
            flush=True)
    else:
      for v in VARIANTS:
        rec = dict(v)
        try:
          fn = case["make"](**v)
          y = np.asarray(jax.block_until_ready(fn(xs[0])))
          rec["err_vs_f32"] = _rel(y, ref)
          rec["err_vs_xla"] = _rel(y, y_xla)
          rec["ms"] = _time(fn, sets, args.iters, args.reps)
        except Exception as exc:  # report and go on with the other variants
          rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["variants"].append(rec)
        print(f"{case['name']} {v}: {rec}", flush=True)
    if not case["reason"] and case.get("diagnostics"):
      z_sets = [(case["conv"](x), x) for x in xs]
      row["diagnostics_ms"] = {k: _time(f, z_sets, args.iters, args.reps)
                               for k, f in case["diagnostics"].items()}
      print(f"{case['name']} diagnostics (ms): {row['diagnostics_ms']}", flush=True)
    rows.append(row)
  print(f"\n| block (N={b}, bf16) | XLA fwd ms | Triton fwd ms | XLA conv alone ms | "
        f"best Mosaic fwd ms | config | x XLA | floor ms | eff | err vs f32 ref (XLA's) |")
  print("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
  for row in rows:
    ok = [v for v in row["variants"] if "ms" in v]
    if not ok:
      print(f"| {row['block']} | {row['xla_ms']:.3f} | {row.get('triton_ms', float('nan')):.3f} "
            f"| {row['conv_ms']:.3f} | - | "
            f"{row.get('skipped', 'all variants failed')} | | {row['floor_ms']:.3f} | | |")
      continue
    best = min(ok, key=lambda v: v["ms"])
    cfg = f"bm{best['block_m']} hc{best['hidden_chunk']} s{best['stages']}"
    print(f"| {row['block']} | {row['xla_ms']:.3f} | {row.get('triton_ms', float('nan')):.3f} "
          f"| {row['conv_ms']:.3f} | {best['ms']:.3f} | "
          f"{cfg} | {row['xla_ms'] / best['ms']:.2f} | {row['floor_ms']:.3f} | "
          f"{row['floor_ms'] / best['ms']:.2f} | {best['err_vs_f32']:.1e} "
          f"({row['xla_err_vs_f32']:.1e}) |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(device=dev, batch=b, rows=rows), fh, indent=1, default=str)


if __name__ == "__main__":
  main()
