"""Pipelined vs serial Mosaic GPU pointwise kernels, on the GPU (kernel level, no conv).

    PYTHONPATH=. python3 -m benchmarks.mosaic_pipelined [--batch 128] [--json out.json]

``mosaic_mlp.fused_mlp(pipelined=True)`` and ``mosaic_split.split_mlp(expand_pipelined=True)``
keep a wgmma in flight while an activation runs (two hidden accumulators).  This times each
against the serial form with the tiles ``block_impl=None`` uses today, at ConvNeXt-T's four
stage widths and two ConvFirst MLP shapes (batch ``--batch`` of 224x224 images: M = batch x
H x W rows), bfloat16, after checking every variant against the float32 reference
(max |y - ref| / max |ref|).  Times: median of ``--iters`` samples of ``--reps``
back-to-back calls alternating two random inputs, synchronised.  A variant that fails to
compile prints FAILED with the first line of the error.  The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mosaic_mlp, mosaic_split
from pallas_kernels.timing import median_seconds

# (name, hw, C, E, act, normalize, kernel, serial kwargs, pipelined kwargs)
CASES = [
    ("convnext 56x56x96", 56, 96, 384, "gelu", True, "fused",
     dict(block_m=64, stages=2), [dict(pipelined=True, stages=2),
                                   dict(pipelined=True, stages=3)]),
    ("convnext 28x28x192", 28, 192, 768, "gelu", True, "fused",
     dict(block_m=128, stages=2), [dict(pipelined=True, stages=2),
                                    dict(block_m=64, stages=2)]),
    ("convnext 14x14x384", 14, 384, 1536, "gelu", True, "split",
     dict(stages=2, project_block_m=128, block_n=192),
     [dict(stages=2, project_block_m=128, block_n=192, expand_pipelined=True)]),
    ("convnext 7x7x768", 7, 768, 3072, "gelu", True, "split",
     dict(stages=2, project_block_m=128, block_n=192),
     [dict(stages=1, hidden_chunk=32, project_block_m=128, block_n=192,
           expand_pipelined=True)]),
    ("convfirst 56x56x64 E4", 56, 64, 256, "silu", False, "fused",
     dict(block_m=64, stages=2), [dict(pipelined=True, stages=2)]),
    ("convfirst 64x64x64 E6", 64, 64, 384, "silu", False, "fused",
     dict(block_m=64, stages=2), [dict(pipelined=True, stages=2)]),
]


def _inputs(m, c, e, seed):
  k = jax.random.split(jax.random.key(seed), 9)
  n = jax.random.normal
  return (dict(z=n(k[0], (m, c)).astype(jnp.bfloat16), res=n(k[1], (m, c)).astype(jnp.bfloat16),
               w1=n(k[2], (c, e)) * c ** -0.5, b1=n(k[3], (e,)) * 0.1,
               w2=n(k[4], (e, c)) * e ** -0.5, b2=n(k[5], (c,)) * 0.1,
               z_bias=n(k[6], (c,)) * 0.1, row_scale=jax.random.uniform(k[7], (m,)) + 0.5),
          n(k[8], (m, c)).astype(jnp.bfloat16))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  reason = mosaic_mlp.device_unsupported_reason(False)
  if reason is not None:
    raise SystemExit(f"benchmarks.mosaic_pipelined: {reason}")
  rows, table = [], []
  for name, hw, c, e, act, normalize, kind, serial, variants in CASES:
    a, z2 = _inputs(args.batch * hw * hw, c, e, c)
    fn = mosaic_mlp.fused_mlp if kind == "fused" else mosaic_split.split_mlp
    ref = mosaic_mlp.fused_mlp_reference(
        **{k: v.astype(jnp.float32) for k, v in a.items()}, act=act, normalize=normalize)
    ref = np.asarray(ref, np.float32)
    base = None
    for label, kw in [("serial (tuned)", serial)] + [("variant", v) for v in variants]:
      f = jax.jit(lambda z, res, w1, b1, w2, b2, zb, rs, kw=kw: fn(
          z, res, w1, b1, w2, b2, z_bias=zb, row_scale=rs, act=act, normalize=normalize, **kw))
      args1 = (a["z"], a["res"], a["w1"], a["b1"], a["w2"], a["b2"], a["z_bias"],
               a["row_scale"])
      args2 = (z2,) + args1[1:]
      try:
        y = np.asarray(f(*args1), np.float32)
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        ms = median_seconds(f, arg_sets=[args1, args2], warmup=2, iters=args.iters,
                            reps=args.reps) * 1e3
      except Exception as ex:  # noqa: BLE001 - report and go on
        msg = (str(ex) or repr(ex)).splitlines()[0][:160]
        table.append(f"{name:24s} {label:15s} {kw}: FAILED {msg}")
        print(table[-1], flush=True)
        continue
      base = ms if base is None else base
      rows.append(dict(block=name, label=label, kwargs=kw, ms=ms, rel_err=err))
      table.append(f"{name:24s} {label:15s} {ms:8.4f} ms  x{base / ms:5.2f}  err {err:.1e}  {kw}")
      print(table[-1], flush=True)
  device = jax.devices()[0].device_kind
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(device=device, date=datetime.date.today().isoformat(), batch=args.batch,
                     rows=rows), fh, indent=1)
  print(f"\nMosaic kernels, serial vs pipelined, bfloat16, batch {args.batch}, {device}, "
        f"{datetime.date.today().isoformat()} (x = serial time / this time)")
  print("\n".join(table))


if __name__ == "__main__":
  main()
