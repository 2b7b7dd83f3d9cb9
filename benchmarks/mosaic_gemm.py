"""The split form's expand / project kernels (``mosaic_split``) vs their K-streaming GEMM
forms (``mosaic_gemm``) and XLA's plain GEMMs, kernel level, on the GPU.

    PYTHONPATH=. python3 -m benchmarks.mosaic_gemm [--batches 128,256] [--json out.json]

At ConvNeXt-T's wide stage shapes (14x14x384 and 7x7x768, E = 4C, M = batch x H x W rows),
bfloat16: the expand with LayerNorm + GELU (ConvNeXt) and with SiLU and no LayerNorm
(MBConv), each by the split kernel (its default hidden slices; at C=384 also its
warp-specialised form), by ``mosaic_gemm.expand`` at several (tn, slots), one CTA per tile
or persistent CTAs, and by XLA as a plain GEMM (no bias, no activation: a yardstick, not an
equivalent); then the project (y = res + row_scale (h W2 + b2)) likewise.  Each variant is
checked against the float32 reference (max |y - ref| / max |ref|; bf16 output rounding is
~2-4e-3) before it is timed.  Times: median of ``--iters`` samples of ``--reps``
back-to-back calls alternating two random inputs, synchronised (pallas_kernels.timing).  A
variant that fails prints its error and the run goes on.  The table is printed last
(~4.5 minutes on an H100 for batches 128 and 256 with ``--iters 20``).  ``--smoke`` runs
one tiny shape in the Mosaic GPU interpreter (CPU; values only, the times mean nothing;
one GEMM tile per CTA and 3 persistent CTAs, no warp-specialised split expand, no SiLU
expand).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mosaic_gemm, mosaic_mlp, mosaic_split
from pallas_kernels.timing import median_ms

f32 = jnp.float32
SHAPES = ((14, 384), (7, 768))                    # (H = W, C) with E = 4C
# (tn, slots, persistent CTAs); tiles not dividing the width are skipped
GEMM_TILES = ((192, 4, False), (128, 4, False), (192, 4, True), (128, 4, True),
              (256, 3, True), (192, 3, True))
SMOKE_TILES = ((128, 2, False), (128, 2, True))


def _rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, f32), np.float64)
  b = np.asarray(jnp.asarray(b, f32), np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _split_expand(z, zb, w1, b1, *, act, normalize, ws, interpret):
  c, e = w1.shape
  params = dict(compiler_params=mosaic_split.plgpu.CompilerParams(approx_math=True),
                interpret=mosaic_mlp._interpret_params(interpret))
  if ws:
    hc, halves = mosaic_split.choose_ws_tiles(c, e, 1, has_zb=True)
    return mosaic_split.expand_call(z, zb, w1, b1, hc=hc, cb=mosaic_split._column_block(c),
                                    act=act, normalize=normalize, eps=1e-6, stages=2,
                                    bm=mosaic_split.WS_BLOCK_M, ws_slots=1,
                                    ws_staging_halves=halves, **params)
  hc = mosaic_split.choose_hidden_chunk(c, 2)
  return mosaic_split.expand_call(z, zb, w1, b1, hc=hc, cb=mosaic_split._column_block(c),
                                  act=act, normalize=normalize, eps=1e-6, stages=2,
                                  staging=mosaic_split.choose_staging(c, hc, 2), **params)


def _split_project(h, res, rs, w2, b2, *, interpret):
  return mosaic_split.project_call(
      h, res, rs, w2, b2, bn=192 if w2.shape[1] % 192 == 0 else 64, kc=64, stages=3, bm=128,
      compiler_params=mosaic_split.plgpu.CompilerParams(approx_math=True),
      interpret=mosaic_mlp._interpret_params(interpret))


def run(m: int, c: int, args, case: str) -> list[dict]:
  e = 4 * c
  ks = jax.random.split(jax.random.key(m + c), 11)
  n = jax.random.normal
  zs = [(n(ks[i], (m, c)) * 1.5 + 0.3).astype(jnp.bfloat16) for i in range(2)]
  hs = [n(ks[2 + i], (m, e)).astype(jnp.bfloat16) for i in range(2)]
  res = [n(ks[4 + i], (m, c)).astype(jnp.bfloat16) for i in range(2)]
  zb = n(ks[6], (c,)) * 0.1
  w1, b1 = n(ks[7], (c, e)) * c ** -0.5, n(ks[8], (e,)) * 0.1
  w2, b2 = n(ks[9], (e, c)) * e ** -0.5, n(ks[10], (c,)) * 0.1
  rs = jax.random.uniform(ks[0], (m,)) + 0.5
  it = args.interpret
  tiles = SMOKE_TILES if it else GEMM_TILES
  ctas = 3 if it else None  # (the interpreted smoke run: several tiles per persistent CTA)

  def label(tn, st, persistent):
    return f"gemm tn{tn} x{st}" + (" persistent" if persistent else "")

  rows = []

  def time(kind, impl, fn, arg_sets, ref=None):
    row = dict(case=case, rows=m, c=c, e=e, kind=kind, impl=impl)
    try:
      if ref is not None:
        row["err"] = _rel(fn(*arg_sets[0]), ref)
      # (interpreted smoke run: one argument set, so one warm-up call instead of two)
      row["ms"] = median_ms(fn, arg_sets[:1] if args.interpret else arg_sets, args.iters,
                            args.reps)
    except Exception as ex:  # reported, not fatal
      row["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
    rows.append(row)
    print(json.dumps(row), flush=True)

  for act, normalize in (("gelu", True),) if it else (("gelu", True), ("silu", False)):
    kind = "expand LN+GELU" if normalize else "expand SiLU"
    ref = mosaic_mlp.expand_reference(zs[0], w1.astype(jnp.bfloat16), b1, z_bias=zb, act=act,
                                      normalize=normalize)
    z_sets = [(z,) for z in zs]
    for ws in (False, True):
      # (not interpreted: its compute warpgroups wait at once on another warpgroup's loads,
      # the pattern that can hang the interpreter on a 2-core machine)
      if ws and (it or not mosaic_split.choose_ws_tiles(c, e, 1, has_zb=True)):
        continue
      time(kind, "split (ws)" if ws else "split", jax.jit(functools.partial(
          _split_expand, zb=zb, w1=w1, b1=b1, act=act, normalize=normalize, ws=ws,
          interpret=it)), z_sets, ref)
    for tn, st, per in tiles:
      if e % tn == 0:
        time(kind, label(tn, st, per), jax.jit(functools.partial(
            mosaic_gemm.expand, zb=zb, w1=w1, b1=b1, act=act, normalize=normalize, tn=tn,
            stages=st, persistent=per, ctas=ctas, interpret=it)), z_sets, ref)
  ref = res[0].astype(f32) + rs[:, None] * (
      jnp.dot(hs[0].astype(f32), w2.astype(jnp.bfloat16).astype(f32), precision="highest")
      + b2)
  p_sets = list(zip(hs, res))
  time("project", "split 128 rows", jax.jit(functools.partial(
      lambda h, r: _split_project(h, r, rs, w2, b2, interpret=it))), p_sets, ref)
  for tn, st, per in tiles:
    if c % tn == 0:
      time("project", label(tn, st, per), jax.jit(
          lambda h, r, tn=tn, st=st, per=per: mosaic_gemm.project(
              h, w2, b2, r, rs, tn=tn, stages=st, persistent=per, ctas=ctas, interpret=it)),
          p_sets, ref)
  if not it:
    plain = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=f32).astype(jnp.bfloat16))
    time("expand (plain GEMM)", "xla", plain, [(z, w1.astype(jnp.bfloat16)) for z in zs])
    time("project (plain GEMM)", "xla", plain, [(h, w2.astype(jnp.bfloat16)) for h in hs])
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="128,256")
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--smoke", action="store_true",
                  help="one tiny shape (256 rows, C=128) in the interpreter on a CPU")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  args.interpret = args.smoke
  if args.smoke:
    args.iters, args.reps = 1, 1
  else:
    reason = mosaic_mlp.device_unsupported_reason(False)
    if reason is not None:
      raise SystemExit(f"benchmarks.mosaic_gemm: {reason} (--smoke runs on a CPU)")
  out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
             dtype="bfloat16", rows=[])
  cases = ([("smoke 256x128", 256, 128)] if args.smoke else
           [(f"{hw}x{hw}x{c} b{b}", b * hw * hw, c) for b in map(int, args.batches.split(","))
            for hw, c in SHAPES])
  for case, m, c in cases:
    out["rows"] += run(m, c, args, case)
    if args.json:
      with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
  print(f"\n{out['device']}, {out['date']}, bf16; ms (relative error vs float32)")
  print("| case | kernel | implementation | ms | err |")
  print("|---|---|---|---:|---:|")
  for r in out["rows"]:
    ms = f"{r['ms']:.4f}" if "ms" in r else r.get("error", "")[:60]
    err = f"{r['err']:.1e}" if "err" in r else ""
    print(f"| {r['case']} | {r['kind']} | {r['impl']} | {ms} | {err} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
