"""The Pallas-Triton depthwise conv (``convnext_block.dwconv_triton``) vs XLA's, on the GPU.

    PYTHONPATH=. python3 -m benchmarks.dwconv_kernel [--batch 128] [--json out.json]

For each ConvNeXt-T stage shape (7x7 kernel, bfloat16) this checks every tile variant
against XLA's conv on the same input (max |y - ref| / max |ref|, float32 reference) and
times it, XLA's conv (+ bias) timed in the same process.  Then the whole block forward
three ways: XLA's block, the Mosaic kernel(s) after XLA's conv (the one-kernel form for
C <= 256, the split form above), and after the fastest Pallas conv variant.  Times:
median of ``--iters`` samples of ``--reps`` back-to-back calls alternating two random
inputs, synchronised (pallas_kernels.timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.timing import median_ms as _ms

SHAPES = ((56, 96), (28, 192), (14, 384), (7, 768))
VARIANTS = tuple(
    dict(strip=s, tile_w=tw, cblock=cb, num_warps=nw, fused_fma=fma)
    for s, tw, cb, nw, fma in (
        (0, 0, 32, 4, True), (0, 0, 32, 4, False), (14, 0, 32, 4, True), (8, 0, 32, 2, True),
        (56, 8, 32, 4, True), (28, 8, 32, 4, True), (56, 8, 32, 2, True), (28, 8, 64, 4, True),
        (28, 16, 32, 4, True), (14, 16, 32, 4, True), (14, 32, 32, 4, True),
        (7, 0, 32, 4, True), (4, 32, 64, 4, True)))
# The column-walk kernel (DwconvTiles(columns=True)): with --columns these run after the
# default tiles instead of VARIANTS (index order = --pick).  The first entry is the walk's
# defaults (loads prefetched one column ahead), the second without the prefetch.
COLUMN_VARIANTS = (dict(columns=True), dict(columns=True, prefetch=False),
                   dict(columns=True, strip=4, prefetch=False),
                   dict(columns=True, cblock=64, prefetch=False),
                   dict(columns=True, unroll=2, prefetch=False),
                   dict(columns=True, rows=14), dict(columns=True, cblock=64))

def _rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--shapes", default="all", help="comma list of H (e.g. 56,28) or 'all'")
  ap.add_argument("--no-block", action="store_true", help="skip the whole-block timings")
  ap.add_argument("--columns", action="store_true",
                  help="time the default tiles and the column-walk variants only")
  ap.add_argument("--pick", default=None,
                  help="with --columns: comma list of COLUMN_VARIANTS indices (default all)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  from pallas_kernels import mosaic_mlp
  from pallas_kernels.convnext_block import dwconv, dwconv_triton, mosaic, tuning
  from pallas_kernels.convnext_block.reference import (
      ConvNeXtBlockParams, convnext_block_reference)

  columns = COLUMN_VARIANTS
  if args.pick:
    try:
      columns = tuple(COLUMN_VARIANTS[int(i)] for i in args.pick.split(","))
    except (ValueError, IndexError):
      ap.error(f"--pick: comma list of indices 0..{len(COLUMN_VARIANTS) - 1}, got {args.pick!r}")
  shapes = SHAPES if args.shapes == "all" else tuple(
      s for s in SHAPES if str(s[0]) in args.shapes.split(","))
  kind = jax.devices()[0].device_kind.lower()
  bandwidth = 4.8e12 if "h200" in kind else 3.35e12  # datasheet DRAM bytes/s (H100 SXM else)
  rng = np.random.default_rng(0)
  out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
             batch=args.batch, dtype="bfloat16", rows=[])
  table = []
  for hw, c in shapes:
    f = lambda *s, scale: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
    xs = [jnp.asarray(rng.standard_normal((args.batch, hw, hw, c)), jnp.bfloat16)
          for _ in range(2)]
    arg_sets = [(x,) for x in xs]
    kern, bias = f(7, 7, c, scale=0.1), f(c, scale=0.1)
    xla = jax.jit(lambda x: (dwconv.depthwise_conv(x, kern, wgrad="xla").astype(jnp.float32)
                             + bias).astype(x.dtype))
    ref = dwconv._plain(xs[0].astype(jnp.float32), kern) + bias
    row = dict(shape=[args.batch, hw, hw, c], xla_ms=_ms(xla, arg_sets, args.iters, args.reps),
               xla_err=_rel(xla(xs[0]), ref), variants=[])
    row["floor_ms"] = 2 * xs[0].size * 2 / bandwidth * 1e3  # read x, write z once
    best = None
    for v in ((VARIANTS[0],) + columns if args.columns else VARIANTS):
      tiles = dwconv_triton.DwconvTiles(**v)
      fn = jax.jit(lambda x, t=tiles: dwconv_triton.depthwise_conv(x, kern, bias, tiles=t))
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(xs[0]))
        compile_s = time.perf_counter() - t0
        err = _rel(fn(xs[0]), ref)
        ms = _ms(fn, arg_sets, args.iters, args.reps)
      except Exception as e:  # a variant that fails to compile is reported, not fatal
        row["variants"].append(dict(v, error=f"{type(e).__name__}: {str(e)[:200]}"))
        continue
      row["variants"].append(dict(v, ms=ms, err=err, compile_s=compile_s))
      print(f"  {hw}x{hw}x{c} {v}: {ms:.3f} ms, err {err:.1e}, first call {compile_s:.1f} s",
            flush=True)
      if err < 1e-2 and (best is None or ms < best[1]):
        best = (tiles, ms, err)
    row["best"] = None if best is None else dict(best[0]._asdict(), ms=best[1], err=best[2])
    line = [f"{hw}x{hw}x{c}", f"{row['xla_ms']:.3f}",
            "-" if best is None else f"{best[1]:.3f}",
            "-" if best is None else f"{row['xla_ms'] / best[1]:.2f}",
            "-" if best is None else str(tuple(best[0])), f"{row['floor_ms']:.3f}"]
    if not args.no_block and best is not None and mosaic_mlp.device_unsupported_reason(False) is None:
      p = ConvNeXtBlockParams(
          dw_kernel=kern, dw_bias=bias, ln_scale=1 + f(c, scale=0.1), ln_bias=f(c, scale=0.1),
          fc1_kernel=f(c, 4 * c, scale=c ** -0.5), fc1_bias=f(4 * c, scale=0.1),
          fc2_kernel=f(4 * c, c, scale=(4 * c) ** -0.5), fc2_bias=f(c, scale=0.1),
          gamma=1 + f(c, scale=0.1))
      split = mosaic.unsupported_reason(xs[0].shape, p, jnp.bfloat16) is not None
      if mosaic.unsupported_reason(xs[0].shape, p, jnp.bfloat16, split=split) is None:
        t = tuning.get_tiles(c, jnp.bfloat16)
        kw = dict(hidden_chunk=t.mosaic_hidden, stages=t.mosaic_stages, block_m=t.mosaic_block_m,
                  split=split, project_stages=t.mosaic_project_stages,
                  project_block_m=t.mosaic_project_block_m, block_n=t.mosaic_block_n or None)
        if split and c > 512:  # the split form's defaults (stage 4 uses XLA under None)
          kw.update(stages=2, project_stages=3, project_block_m=64, block_n=None)
        blk_xla = jax.jit(lambda x: convnext_block_reference(x, p))
        blk_m = jax.jit(lambda x: mosaic.forward(x, p, **kw))
        blk_md = jax.jit(lambda x: mosaic.forward(x, p, dwconv_tiles=best[0], **kw))
        ref_b = convnext_block_reference(xs[0].astype(jnp.float32), p)
        row["block"] = dict(
            xla_ms=_ms(blk_xla, arg_sets, args.iters, args.reps),
            mosaic_ms=_ms(blk_m, arg_sets, args.iters, args.reps),
            mosaic_pallas_dw_ms=_ms(blk_md, arg_sets, args.iters, args.reps),
            xla_err=_rel(blk_xla(xs[0]), ref_b), mosaic_err=_rel(blk_m(xs[0]), ref_b),
            mosaic_pallas_dw_err=_rel(blk_md(xs[0]), ref_b))
        b = row["block"]
        line += [f"{b['xla_ms']:.3f}", f"{b['mosaic_ms']:.3f}", f"{b['mosaic_pallas_dw_ms']:.3f}",
                 f"{b['xla_ms'] / b['mosaic_pallas_dw_ms']:.2f}",
                 f"{b['mosaic_pallas_dw_err']:.1e}"]
    out["rows"].append(row)
    table.append(line)
    print(json.dumps(row), flush=True)

  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)
  print(f"\n{out['device']}, jax {out['jax']}, {out['date']}, batch {args.batch}, bf16, ms")
  print("| shape | XLA dwconv | Pallas dwconv | x | best tiles (strip,tile_w,cblock,warps,fma) | "
        "DRAM floor (datasheet) | XLA block | Mosaic+XLA dw | Mosaic+Pallas dw | x XLA block | err |")
  for line in table:
    print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
  main()
