"""ConvFirst / MBConv block benchmark: XLA vs the fused Pallas inference kernel.

    PYTHONPATH=. python3 -m benchmarks.blocks_convfirst [--sweep] [--check] [--kinds mbconv]
        [--json out.json]

Rows: ConvFirst 56x56x64 E4, ConvFirst 64x64x64 E6, MBConv 14x14x256 E4, batch 128, bfloat16,
BatchNorm-folded (inference) blocks, k=3.  For each: XLA fwd ms, Pallas fwd ms, the floor
max(FLOPs / peak, bytes / bandwidth) (``--ceilings``: measured on the GPU that runs it or
an H100's, benchmarks/ceilings.py; FLOPs of the real grouped conv + both matmuls; bytes =
read x + write y + weights once), efficiency = floor / time, and the Pallas output's max
relative error vs XLA's in the same run (max|pallas - xla| / max|xla|).  ``--sweep`` also
times alternative ``BlockConfig``s; ``--check`` then runs GPU correctness checks (float32
and bfloat16, odd shapes, NaN-poisoned outputs).  Times: median over repeats of the mean of
back-to-back calls, alternating two input sets.  ``--kinds`` restricts both to ConvFirst
or MBConv blocks (the k=5 ConvFirst check alone takes about 2 minutes to compile).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.convfirst_block import pallas_triton
from pallas_kernels.convfirst_block.pallas_triton import BlockConfig, default_config
from pallas_kernels.convfirst_block.reference import (
    ConvFirstBlockParams,
    MBConvBlockParams,
    convfirst_block_reference,
    mbconv_block_reference,
)

from benchmarks import ceilings as ceilings_mod

# The floor's ceilings: the H100 constants until ``main`` resolves --ceilings.
CEILINGS = ceilings_mod.H100

SHAPES = [  # (name, kind, H, W, C, E)
    ("ConvFirst 56x56x64 E4", "convfirst", 56, 56, 64, 4),
    ("ConvFirst 64x64x64 E6", "convfirst", 64, 64, 64, 6),
    ("MBConv 14x14x256 E4", "mbconv", 14, 14, 256, 4),
]
# ConvFirstNet-T's stage shapes (--convfirst-t adds them).
SHAPES_T = [
    ("ConvFirst 56x56x96 E4", "convfirst", 56, 56, 96, 4),
    ("ConvFirst 28x28x192 E4", "convfirst", 28, 28, 192, 4),
    ("MBConv 14x14x384 E4", "mbconv", 14, 14, 384, 4),
    ("MBConv 7x7x768 E4", "mbconv", 7, 7, 768, 4),
]

SWEEP = {
    "convfirst": [
        BlockConfig(block_pixels=128, conv_tile=16, hidden_chunk=64, num_warps=4),
        BlockConfig(block_pixels=256, conv_tile=32, hidden_chunk=64, num_warps=8),
        BlockConfig(block_pixels=128, conv_tile=32, hidden_chunk=128, num_warps=8),
    ],
    "mbconv": [
        BlockConfig(block_pixels=64, conv_tile=32, num_warps=4, halo_scratch=True),
        BlockConfig(block_pixels=128, conv_tile=32, num_warps=8, halo_scratch=True),
        BlockConfig(block_pixels=64, conv_tile=16, num_warps=4),
        BlockConfig(block_pixels=128, conv_tile=64, num_warps=8, halo_scratch=True),
        # for the wide stages, whose (pixels x C) accumulator limits the tile
        BlockConfig(block_pixels=32, conv_tile=32, num_warps=4, halo_scratch=True),
        BlockConfig(block_pixels=32, conv_tile=64, num_warps=4, halo_scratch=True),
        BlockConfig(block_pixels=64, conv_tile=64, num_warps=8, halo_scratch=True),
    ],
}


def make_params(kind, key, c, e, k=3):
  hidden = c * e
  ks = jax.random.split(key, 6)
  conv_c = c if kind == "convfirst" else hidden
  n = jax.random.normal
  conv = (n(ks[0], (k, k, 8, conv_c)) / np.sqrt(8 * k * k), 0.1 * n(ks[1], (conv_c,)))
  fc1 = (n(ks[2], (c, hidden)) / np.sqrt(c), 0.1 * n(ks[3], (hidden,)))
  fc2 = (n(ks[4], (hidden, c)) / np.sqrt(hidden), 0.1 * n(ks[5], (c,)))
  if kind == "convfirst":
    return ConvFirstBlockParams(*conv, *fc1, *fc2)
  return MBConvBlockParams(*fc1, *conv, *fc2)


def floor_s(kind, n, h, w, c, e, k=3, itemsize=2):
  pixels = n * h * w
  hidden = c * e
  conv_c = c if kind == "convfirst" else hidden
  flops = 2 * pixels * (k * k * 8 * conv_c + 2 * c * hidden)
  weight_bytes = itemsize * (k * k * 8 * conv_c + 2 * c * hidden)
  bytes_ = 2 * pixels * c * itemsize + weight_bytes
  return CEILINGS.floor_s(flops, bytes_), flops, bytes_


def time_fn(fn, inputs, *, calls=20, repeats=7):
  for a in inputs:
    jax.block_until_ready(fn(*a))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for i in range(calls):
      out = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return float(np.median(times))


def max_rel(out, ref):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def norm_rel(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def gpu_checks(kinds=("convfirst", "mbconv")):
  """Odd shapes, both dtypes, NaN-poisoned outputs, vs the reference; returns #failures."""
  cases = ([("convfirst", c, 3, (2, 5, 7)) for c in (32, 96, 192)]
           + [("convfirst", 96, 5, (3, 11, 13))]
           + [("mbconv", c, 3, (2, 5, 7)) for c in (128, 384, 768)]
           + [("mbconv", 384, 5, (2, 9, 6))])
  cases += [(kind, c, k, nhw, BlockConfig(block_pixels=32, conv_tile=32, halo_scratch=True))
            for kind, c, k, nhw in cases if kind == "mbconv"]
  cases = [case for case in cases if case[0] in kinds]
  fails = 0
  for kind, c, k, nhw, *cfg in cases:
    cfg = cfg[0] if cfg else None
    fn = pallas_triton.convfirst_block_pallas if kind == "convfirst" else pallas_triton.mbconv_block_pallas
    ref_fn = convfirst_block_reference if kind == "convfirst" else mbconv_block_reference
    kx, kp = jax.random.split(jax.random.key(c * 10 + k))
    x = jax.random.normal(kx, (*nhw, c))
    p = make_params(kind, kp, c, 4, k)
    with jax.default_matmul_precision("highest"):
      ref32 = ref_fn(x, p)
      out = fn(x, p, output_init=jnp.full(x.shape, jnp.nan), config=cfg)
      xb = x.astype(jnp.bfloat16)
      outb = fn(xb, p, output_init=jnp.full(x.shape, jnp.nan, jnp.bfloat16), config=cfg)
      refb = ref_fn(xb.astype(jnp.float32), p)
    e32, eb = norm_rel(out, ref32), norm_rel(outb, refb)
    ok = e32 < 1e-5 and eb < 1e-2 and np.isfinite(np.asarray(out)).all() and np.isfinite(
        np.asarray(outb, np.float32)).all()
    fails += not ok
    print(f"check {kind:<9} C={c:<4} k={k} {nhw} {'scratch' if cfg else ''}: f32 {e32:.1e} bf16 {eb:.1e} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
  return fails


def bench(batch, sweep, kinds=("convfirst", "mbconv"), shapes=SHAPES):
  rows = []
  for name, kind, h, w, c, e in shapes:
    if kind not in kinds:
      continue
    kx, kp = jax.random.split(jax.random.key(h * c + e))
    xs = [(jax.random.normal(kk, (batch, h, w, c), jnp.bfloat16),)
          for kk in jax.random.split(kx, 2)]
    params = make_params(kind, kp, c, e)
    ref_fn = convfirst_block_reference if kind == "convfirst" else mbconv_block_reference
    pal_fn = pallas_triton.convfirst_block_pallas if kind == "convfirst" else pallas_triton.mbconv_block_pallas
    xla = jax.jit(lambda x, ref_fn=ref_fn: ref_fn(x, params))
    t_xla = time_fn(xla, xs)
    y_xla = xla(*xs[0])
    fl, flops, bytes_ = floor_s(kind, batch, h, w, c, e)
    configs = [default_config(kind, c, c * e)] + (SWEEP[kind] if sweep else [])
    for i, cfg in enumerate(configs):
      row = dict(block=name, batch=batch, dtype="bfloat16", xla_ms=t_xla * 1e3,
                 floor_ms=fl * 1e3, flops=flops, bytes=bytes_, config=vars(cfg),
                 default=i == 0)
      try:
        pal = jax.jit(lambda x, pal_fn=pal_fn, cfg=cfg: pal_fn(x, params, config=cfg))
        t = time_fn(pal, xs)
        row.update(pallas_ms=t * 1e3, speedup=t_xla / t, efficiency=fl / t,
                   max_rel_err=max_rel(pal(*xs[0]), y_xla),
                   tflops=flops / t / 1e12)
      except Exception as ex:  # a config that does not compile is reported, not fatal
        row.update(pallas_ms=None, error=f"{type(ex).__name__}: {str(ex)[:300]}")
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--check", action="store_true")
  p.add_argument("--kinds", default="convfirst,mbconv",
                 help="which blocks to time and check (comma-separated)")
  p.add_argument("--convfirst-t", action="store_true",
                 help="also time ConvFirstNet-T's stage shapes (C=96, 192; MBConv 384, 768)")
  p.add_argument("--json", default=None)
  ceilings_mod.add_argument(p)
  args = p.parse_args(argv)
  kinds = tuple(args.kinds.split(","))
  if not set(kinds) <= {"convfirst", "mbconv"}:
    p.error(f"--kinds takes convfirst and/or mbconv, got {args.kinds!r}")
  global CEILINGS
  CEILINGS = ceilings_mod.resolve(args.ceilings)
  rows = bench(args.batch, args.sweep, kinds,
               SHAPES + SHAPES_T if args.convfirst_t else SHAPES)
  fails = gpu_checks(kinds) if args.check else 0
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  device = jax.devices()[0].device_kind
  print(f"\nConvFirst/MBConv blocks, bf16, batch {args.batch}, {device}, "
        f"{time.strftime('%Y-%m-%d')}; {CEILINGS.describe()}")
  print(f"{'block':<24}{'config':<26}{'XLA ms':>8}{'Pallas ms':>10}{'x XLA':>7}"
        f"{'floor ms':>9}{'eff':>6}{'TFLOP/s':>8}{'max rel':>9}")
  for r in rows:
    c = r["config"]
    cs = (f"P{c['block_pixels']} ct{c['conv_tile']} hc{c['hidden_chunk']} w{c['num_warps']}"
          f" s{c['num_stages']}{' S' if c['halo_scratch'] else ''}")
    cs += "*" if r["default"] else ""
    if r.get("pallas_ms") is None:
      print(f"{r['block']:<24}{cs:<26}{r['xla_ms']:>8.3f}  error: {r['error'][:60]}")
      continue
    print(f"{r['block']:<24}{cs:<26}{r['xla_ms']:>8.3f}{r['pallas_ms']:>10.3f}"
          f"{r['speedup']:>7.2f}{r['floor_ms']:>9.3f}{r['efficiency']:>6.2f}"
          f"{r['tflops']:>8.0f}{r['max_rel_err']:>9.1e}")
  if fails:
    print(f"{fails} GPU correctness checks FAILED")
  return 1 if fails else 0


if __name__ == "__main__":
  sys.exit(main())
