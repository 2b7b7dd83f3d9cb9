"""Training-path ConvNeXt blocks on the GPU: forward + backward of XLA's block vs the
"hybrid" path (XLA's block with the Pallas depthwise conv) vs the Mosaic forward + backward
(pallas_kernels/mosaic_mlp_bwd.py), each with XLA's or the Pallas depthwise-conv kernel
gradient, and that kernel gradient alone.

    PYTHONPATH=. python3 -m benchmarks.mosaic_train [--batch 128] [--shapes 28x192,14x384]
        [--variants "tuned,db1 from"] [--no-wgrad] [--json out.json]

Blocks: ConvNeXt-T's four stages (56x56x96, 28x28x192: one-kernel Mosaic forms; 14x14x384:
the split forms; 7x7x768 has no Mosaic backward -- the split backward kernel's tiles do not
fit shared memory), bfloat16 activations, float32 parameters, random data, drop-path scale
random in {0, 1/0.9} and not differentiated (as in training: the gradient is taken with
respect to x and the parameters), this GPU's tuned tiles otherwise.  Every variant's output
and gradients (x and all nine parameters) are compared with XLA's on the same inputs
(max |a - b| / max |b| over each leaf; the largest is printed); the kernel-gradient
variants with XLA's.  Times: median of ``--iters`` samples of ``--reps`` back-to-back calls
alternating two random inputs, synchronised.  ``--variants``: time only the variants whose
label contains one of these comma-separated words (XLA's block, the base of every ratio,
always runs); ``--no-wgrad``: skip the kernel-gradient-alone rows.  The table is printed
last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mosaic_mlp, mosaic_mlp_bwd
from pallas_kernels.convnext_block import api, dwconv, dwconv_triton, tuning
from pallas_kernels.timing import median_ms as _ms

SHAPES = ((56, 96), (28, 192), (14, 384), (7, 768))


def _max_rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if np.isnan(a).any():
    return float("nan")
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _fwd_bwd(f):
  """y and the gradients with respect to x and the parameters (dps held constant)."""
  def run(x, p, d, g):
    y, vjp = jax.vjp(lambda x, p: f(x, p, d), x, p)
    return y, vjp(g)
  return jax.jit(run)


def _inputs(key, batch, hw, c):
  kx, kp, kg, kd = jax.random.split(key, 4)
  x = jax.random.normal(kx, (batch, hw, hw, c), jnp.float32).astype(jnp.bfloat16)
  p = tuning.reference_params(kp, c)
  d = (jax.random.uniform(kd, (batch,)) > 0.1).astype(jnp.float32) / 0.9
  g = jax.random.normal(kg, x.shape, jnp.float32).astype(jnp.bfloat16)
  return x, p, d, g


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
  """"28x192,14x384" -> ((28, 192), (14, 384)): square images of side HW with C channels."""
  try:
    shapes = tuple(tuple(int(v) for v in item.split("x")) for item in text.split(","))
  except ValueError:
    shapes = ()
  if not shapes or any(len(sh) != 2 or min(sh) <= 0 for sh in shapes):
    raise argparse.ArgumentTypeError(f"expected HWxC[,HWxC...], e.g. 28x192,14x384; got {text!r}")
  return shapes


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                  help="HWxC list, e.g. 28x192,14x384 (default: the four ConvNeXt-T stages)")
  ap.add_argument("--variants", default=None,
                  help="comma-separated words: only variants whose label contains one "
                       "(e.g. 'tuned,db1 from'); XLA's block always runs")
  ap.add_argument("--no-wgrad", action="store_true",
                  help="skip the depthwise conv's kernel gradient timed alone")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  wanted = None if args.variants is None else [w.strip() for w in args.variants.split(",")
                                                if w.strip()]
  reason = mosaic_mlp.device_unsupported_reason(False)
  if reason is not None:
    raise SystemExit(f"benchmarks.mosaic_train: {reason}")
  device = jax.devices()[0].device_kind
  rows, table = [], []

  def record(name, label, ms, base, err=None, **extra):
    rows.append(dict(block=name, variant=label, ms=ms, max_rel_err=err, **extra))
    e = "" if err is None else f"  max err vs XLA {err:.1e}"
    x = "" if base is None else f"  x{base / ms:5.2f}"
    table.append(f"{name:20s} {label:34s} {ms:8.3f} ms{x}{e}")
    print(table[-1], flush=True)

  for hw, c in args.shapes:
    name = f"convnext {hw}x{hw}x{c}"
    sets = [_inputs(jax.random.key(i), args.batch, hw, c) for i in range(2)]
    tuned = tuning.get_tiles(c, jnp.bfloat16)
    rep = lambda **kw: dataclasses.replace(tuned, **kw)
    variants = [("xla", "xla", None),
                ("tuned (this GPU's table)", None, tuned),
                ("hybrid", None, rep(mosaic_backward=False, mosaic_dwconv_wgrad="auto")),
                ("hybrid, Pallas dwconv wgrad", None,
                 rep(mosaic_backward=False, mosaic_dwconv_wgrad="pallas")),
                ("hybrid, column-walk dwconv wgrad", None,
                 rep(mosaic_backward=False, mosaic_dwconv_wgrad="pallas_columns"))]
    if c <= 384:
      variants += [(f"mosaic backward (stages {tuned.mosaic_bwd_stages})", None,
                    rep(mosaic_backward=True, mosaic_dwconv_wgrad="auto")),
                   ("mosaic backward, Pallas dwconv wgrad", None,
                    rep(mosaic_backward=True, mosaic_dwconv_wgrad="pallas")),
                   ("mosaic backward, column-walk dwconv wgrad", None,
                    rep(mosaic_backward=True, mosaic_dwconv_wgrad="pallas_columns")),
                   ("mosaic backward, zn recomputed by XLA", None,
                    rep(mosaic_backward=True, mosaic_dwconv_wgrad="auto", mosaic_bwd_zn=False)),
                   ("mosaic backward, db1 " + ("from XLA" if tuned.mosaic_bwd_db1
                                               else "in the kernel (64-row CTAs)"), None,
                    rep(mosaic_backward=True, mosaic_dwconv_wgrad="auto",
                        mosaic_bwd_db1=not tuned.mosaic_bwd_db1,
                        # the column sums exist in the 64-row kernel only
                        mosaic_bwd_block_m=(tuned.mosaic_bwd_block_m if tuned.mosaic_bwd_db1
                                            else 64)))]
    if c <= 384 and tuned.mosaic_backward:  # db1 as one more row of the dW1 GEMM
      variants.append(("mosaic backward, db1 from the dW1 GEMM", None,
                       rep(mosaic_bwd_db1_gemm=True, mosaic_bwd_db1=False)))
      variants.append(("mosaic backward, db1 + db2 from the GEMMs", None,
                       rep(mosaic_bwd_db1_gemm=True, mosaic_bwd_db1=False,
                           mosaic_bwd_db2_gemm=True)))
    if 256 < c <= 384:  # the split backward with two compute warpgroups
      variants.append(("mosaic backward, two-warpgroup split", None,
                       rep(mosaic_backward=True, mosaic_bwd_stages=1, mosaic_bwd_split_ws=True)))
    if c <= 256:  # the one-kernel backward: the other CTA size
      other = 192 - tuned.mosaic_bwd_block_m  # 64 <-> 128
      variants.append((f"mosaic backward, {other}-row CTAs", None,
                       rep(mosaic_backward=True, mosaic_bwd_block_m=other)))
    ref = None
    base = None
    if wanted is not None:
      variants = [v for v in variants
                  if v[0] == "xla" or any(w in v[0] for w in wanted)]
    for label, impl, tiles in variants:
      if tiles is not None and tiles.mosaic_backward and api.train_kernel(
          sets[0][0].shape, jnp.bfloat16, sets[0][1], tiles, False) == "xla":
        # implementation=None would quietly time XLA's block under this label
        table.append(f"{name:20s} {label:40s} SKIPPED: these tiles fall back to XLA's block")
        print(table[-1], flush=True)
        continue
      f = lambda x, p, d, impl=impl, tiles=tiles: api.convnext_block(
          x, p, d, implementation=impl, tiles=tiles)
      fb = _fwd_bwd(f)
      try:
        out = fb(*sets[0])
        leaves = [out[0], *jax.tree.leaves(out[1])]
        err = None
        if ref is None:
          ref = leaves
        else:
          err = max(_max_rel(a, b) for a, b in zip(leaves, ref))
        ms = _ms(fb, sets, args.iters, args.reps)
      except Exception as ex:  # noqa: BLE001 - report and go on
        msg = (str(ex) or repr(ex)).splitlines()[0][:200]
        table.append(f"{name:20s} {label:40s} FAILED {type(ex).__name__}: {msg}")
        print(table[-1], flush=True)
        continue
      base = ms if base is None else base
      record(name, label + " (fwd+bwd)", ms, base, err)

    # The depthwise conv's kernel gradient alone: XLA's, "auto", the Pallas kernel's tiles.
    if args.no_wgrad:
      continue
    x, _, _, g = sets[0]
    x2, _, _, g2 = sets[1]
    kern = jax.random.normal(jax.random.key(5), (7, 7, c)) * 0.1
    wsets = [(x, g), (x2, g2)]
    wref = None
    wbase = None
    for label, method, wt in (("XLA", "xla", None), ("auto", "auto", None),
                              ("Pallas default", "pallas", None),
                              ("Pallas tile_w 16", "pallas", dwconv_triton.WgradTiles(tile_w=16)),
                              ("Pallas cblock 16", "pallas", dwconv_triton.WgradTiles(cblock=16)),
                              ("Pallas strip 4", "pallas", dwconv_triton.WgradTiles(strip=4)),
                              ("Pallas 8 warps", "pallas", dwconv_triton.WgradTiles(num_warps=8))):
      if method == "pallas":
        fn = jax.jit(lambda x, g, wt=wt: dwconv_triton.depthwise_conv_wgrad(x, g, 7, tiles=wt))
      else:
        fn = jax.jit(lambda x, g, method=method: jax.vjp(
            lambda w: dwconv.depthwise_conv(x, w, wgrad=method), kern)[1](g)[0])
      try:
        val = fn(*wsets[0])
        err = None
        if wref is None:
          wref = val
        else:
          err = _max_rel(val, wref)
        ms = _ms(fn, wsets, args.iters, args.reps)
      except Exception as ex:  # noqa: BLE001
        table.append(f"{name:20s} dwconv wgrad {label}: FAILED "
                     f"{(str(ex) or repr(ex)).splitlines()[0][:200]}")
        print(table[-1], flush=True)
        continue
      wbase = ms if wbase is None else wbase
      record(name, f"dwconv wgrad alone, {label}", ms, wbase, err)

  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(device=device, date=datetime.date.today().isoformat(), batch=args.batch,
                     dtype="bfloat16", rows=rows), fh, indent=1)
  print(f"\nConvNeXt blocks, forward + backward (grads of x and the parameters), bfloat16, "
        f"batch {args.batch}, {device}, {datetime.date.today().isoformat()} "
        f"(x = XLA time / this time)")
  print("\n".join(table))


if __name__ == "__main__":
  main()
