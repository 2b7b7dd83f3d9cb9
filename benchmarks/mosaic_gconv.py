"""The Mosaic GPU grouped conv and the MBConv / ConvFirst stages on it
(``convfirst_block.mosaic_gconv``) vs XLA.

    PYTHONPATH=. python3 -m benchmarks.mosaic_gconv [--batch 128] [--parts conv,mbconv,convfirst]
        [--json out.json]

act(group-width-8 3x3 conv(x) + bias) at the shapes ConvFirstNet runs it: the MBConv
blocks' hidden tensors (convfirst_t: 14x14x1536 and 7x7x3072, SiLU), which the kernel is
for, and one ConvFirst block input (28x28x192, bias only; wide images are a poor fit: the
shared-memory window is block_m + 16 (W + 2) rows).  XLA = what the models' XLA path runs
(the conv in x.dtype, + bias, activation).  For each kernel variant (``block_m``,
``chunk``, pipelined ``per_cta`` / ``stages``) it reports the whole call (layout in, kernel,
layout out) and the kernel alone on input already in the padded-row layout, with the error
of each against the float32 reference.  Then the MBConv block (inference form, k=3, E=4,
at convfirst_t's 14x14x384 and 7x7x768): XLA's block vs ``mosaic_gconv.mbconv_forward``
(layout passes + three Mosaic kernels) and ``mbconv_rows`` alone (input already laid out)
for each grouped-conv setting in ``GCONV``; and convfirst_t's two MBConv stages (9 blocks
at 14x14x384, 3 at 7x7x768) as XLA's chain vs ``mbconv_stage_forward``.  Then ("convfirst")
convfirst_t's two ConvFirst stages (3 blocks each at 56x56x96 and 28x28x192, k=3, E=4, folded)
as XLA's chain, block by block with ``convfirst_block(implementation="pallas")`` (XLA's
grouped conv + the Mosaic MLP kernel) and ``convfirst_stage_forward`` (the padded-row
layout: this conv + the MLP kernel, with 64- and 128-row MLP CTAs where C allows).
``--parts`` picks the sections.  Times: median of ``--iters`` samples of ``--reps``
back-to-back calls alternating two random inputs (pallas_kernels.timing).  Needs a Hopper
GPU; about 4-5 minutes on an H100 for the first two parts, ~2 for "convfirst".
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.dwconv_kernel import _rel
from pallas_kernels.timing import median_ms

# (H, C, activation): convfirst_t's MBConv hidden tensors (E=4) and ConvFirst block inputs.
SHAPES = ((14, 1536, "silu"), (7, 3072, "silu"), (28, 192, "identity"))
# Kernel settings: unpipelined (the default: 256-row CTAs) and the best pipelined ones of
# the H100 sweep of 2026-11-27 (benchmarks/RESULTS.md; 16 chunks per CTA and 64-row CTAs
# were slower everywhere).
VARIANTS = (dict(block_m=128, chunk=32), dict(block_m=256, chunk=32),
            dict(block_m=128, chunk=32, per_cta=8), dict(block_m=128, chunk=32, per_cta=6),
            dict(block_m=256, chunk=32, per_cta=3))
# grouped-conv settings of the MBConv block / stage runs (mbconv_rows' gconv_* arguments)
GCONV = (dict(), dict(per_cta=6, block_m=128))
# (H, C, blocks): convfirst_t's MBConv stages (stage 3: 9 blocks at 14x14x384, stage 4: 3
# at 7x7x768), E=4.
STAGES = ((14, 384, 9), (7, 768, 3))
# (H, C, blocks): convfirst_t's ConvFirst stages, E=4.
CONVFIRST_STAGES = ((56, 96, 3), (28, 192, 3))
PARTS = ("conv", "mbconv", "convfirst")


def parse_parts(text: str) -> tuple[str, ...]:
  parts = tuple(p.strip() for p in text.split(",") if p.strip())
  bad = [p for p in parts if p not in PARTS]
  if not parts or bad:
    raise argparse.ArgumentTypeError(f"--parts takes a comma-separated subset of {PARTS}, "
                                     f"got {text!r}")
  return parts


def _gconv_sweep(call, inputs, args):
  """({json of a GCONV setting: ms}, the jitted call with the default setting) for
  ``call(x, gconv_block_m=..., ...)`` over the one-argument ``inputs``."""
  times, default = {}, None
  for g in GCONV:
    fn = jax.jit(lambda x, g=g: call(x, **{f"gconv_{k}": v for k, v in g.items()}))
    times[json.dumps(g)] = median_ms(fn, [(x,) for x in inputs], args.iters, args.reps)
    if not g:
      default = fn
  return times, default


def _table_row(name, r, cells):
  """A markdown row: ``cells``, or (None: a failed case) XLA's time and the error."""
  if cells is None:
    cells = [f"{r['xla_ms']:.3f}", r["error"][:60]]
  print("| " + " | ".join([name, *cells]) + " |")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--parts", type=parse_parts, default=PARTS,
                  help="comma-separated sections: conv (the kernel alone), mbconv (blocks and "
                       "stages), convfirst (stages); default all")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  from pallas_kernels import mosaic_mlp
  from pallas_kernels.convfirst_block import mosaic_gconv as mg
  from pallas_kernels.convfirst_block import api
  from pallas_kernels.convfirst_block.reference import (
      ConvFirstBlockParams, MBConvBlockParams, convfirst_block_reference, grouped_conv,
      mbconv_block_reference)
  reason = mosaic_mlp.device_unsupported_reason(False)
  if reason is not None:
    raise SystemExit(f"benchmarks.mosaic_gconv: {reason}")

  rng = np.random.default_rng(0)
  out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
             batch=args.batch, dtype="bfloat16", rows=[])
  lines = []
  for hw, c, act in SHAPES if "conv" in args.parts else ():
    shape = (args.batch, hw, hw, c)
    xs = [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2)]
    kern = jnp.asarray(rng.standard_normal((3, 3, 8, c)) * 72 ** -0.5, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c) * 0.1, jnp.float32)
    ref = mg.grouped_conv_act_reference(xs[0].astype(jnp.float32), kern, bias, act=act)

    def xla_fn(x):
      y = grouped_conv(x, kern) + bias.astype(x.dtype)
      return jax.nn.silu(y) if act == "silu" else y

    xla = jax.jit(xla_fn)
    row = dict(shape=list(shape), act=act, variants=[],
               xla_ms=median_ms(xla, [(x,) for x in xs], args.iters, args.reps),
               xla_err=_rel(xla(xs[0]), ref))
    best = None
    for v in VARIANTS:
      if v.get("per_cta", 1) and (c // v["chunk"]) % v.get("per_cta", 1):
        continue
      full = jax.jit(lambda x, v=v: mg.grouped_conv_act(x, kern, bias, act=act, **v))
      lay = mg.padded_rows(*shape[:3])
      rows_in = [jax.block_until_ready(mg.to_padded_rows(x, lay)) for x in xs]
      kernel_only = jax.jit(lambda xr, v=v, lay=lay: mg.grouped_conv_rows(
          xr, kern, bias, lay, act=act, **v))
      try:
        err = _rel(full(xs[0]), ref)
        res = dict(v, full_ms=median_ms(full, [(x,) for x in xs], args.iters, args.reps),
                   kernel_ms=median_ms(kernel_only, [(r,) for r in rows_in], args.iters,
                                       args.reps), err=err)
      except Exception as e:  # a variant that fails to compile is reported, not fatal
        res = dict(v, error=f"{type(e).__name__}: {str(e)[:300]}")
      row["variants"].append(res)
      print(json.dumps(dict(shape=shape, **res)), flush=True)
      if "kernel_ms" in res and res["err"] < 2e-2 and (best is None
                                                         or res["kernel_ms"] < best["kernel_ms"]):
        best = res
    out["rows"].append(row)
    lines.append(f"| {hw}x{hw}x{c} {act} | {row['xla_ms']:.3f} | "
                 + ("- | - | - | - |" if best is None else
                    f"{best['full_ms']:.3f} | {best['kernel_ms']:.3f} | "
                    f"bm{best['block_m']} cc{best['chunk']} n{best.get('per_cta', 0)} "
                    f"s{best.get('stages', 2)} | {best['err']:.1e} |")
                 + f" {row['xla_err']:.1e} |")
  blocks = []
  f = lambda *s, scale: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)

  def mbconv_params(c):
    return MBConvBlockParams(
        fc1_kernel=f(c, 4 * c, scale=c ** -0.5), fc1_bias=f(4 * c, scale=0.1),
        conv_kernel=f(3, 3, 8, 4 * c, scale=72 ** -0.5), conv_bias=f(4 * c, scale=0.1),
        fc2_kernel=f(4 * c, c, scale=(4 * c) ** -0.5), fc2_bias=f(c, scale=0.1))

  for hw, c in ((14, 384), (7, 768)) if "mbconv" in args.parts else ():
    shape = (args.batch, hw, hw, c)
    xs = [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2)]
    p = mbconv_params(c)
    ref = mbconv_block_reference(xs[0].astype(jnp.float32), p)
    xla = jax.jit(lambda x: mbconv_block_reference(x, p))
    mos = jax.jit(lambda x: mg.mbconv_forward(x, p))
    lay = mg.padded_rows(*shape[:3])
    mask = mg.row_mask(lay)
    rows_in = [jax.block_until_ready(mg.to_padded_rows(x, lay)) for x in xs]
    row = dict(shape=list(shape), expansion=4,
               xla_ms=median_ms(xla, [(x,) for x in xs], args.iters, args.reps),
               xla_err=_rel(xla(xs[0]), ref), gconv={})
    try:
      row.update(mosaic_ms=median_ms(mos, [(x,) for x in xs], args.iters, args.reps),
                 mosaic_err=_rel(mos(xs[0]), ref))
      row["gconv"], _ = _gconv_sweep(
          lambda xr, **g: mg.mbconv_rows(xr, p, lay, mask, **g), rows_in, args)
      row["rows_ms"] = min(row["gconv"].values())
      row["rows_best"] = min(row["gconv"], key=row["gconv"].get)
    except Exception as e:  # reported, not fatal
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["blocks"] = blocks
    blocks.append(row)
    print(json.dumps(row), flush=True)
  stages = []
  for hw, c, depth in STAGES if "mbconv" in args.parts else ():
    shape = (args.batch, hw, hw, c)
    xs = [jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2)]
    ps = tuple(mbconv_params(c) for _ in range(depth))

    def chain(x, ps=ps):
      for p in ps:
        x = mbconv_block_reference(x, p)
      return x

    ref = chain(xs[0].astype(jnp.float32))
    xla = jax.jit(chain)
    row = dict(shape=list(shape), blocks=depth, expansion=4,
               row_overhead=mg.row_overhead(*shape[:3]),
               xla_ms=median_ms(xla, [(x,) for x in xs], args.iters, args.reps),
               xla_err=_rel(xla(xs[0]), ref), gconv={})
    try:
      row["gconv"], default = _gconv_sweep(
          lambda x, ps=ps, **g: mg.mbconv_stage_forward(x, ps, **g), xs, args)
      row["mosaic_err"] = _rel(default(xs[0]), ref)
      row["mosaic_ms"] = min(row["gconv"].values())
      row["mosaic_best"] = min(row["gconv"], key=row["gconv"].get)
    except Exception as e:  # reported, not fatal
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    stages.append(row)
    out["stages"] = stages
    print(json.dumps(row), flush=True)
  cf_stages = []

  def convfirst_params(c):
    return ConvFirstBlockParams(
        conv_kernel=f(3, 3, 8, c, scale=72 ** -0.5), conv_bias=f(c, scale=0.1),
        fc1_kernel=f(c, 4 * c, scale=c ** -0.5), fc1_bias=f(4 * c, scale=0.1),
        fc2_kernel=f(4 * c, c, scale=0.3 * (4 * c) ** -0.5), fc2_bias=f(c, scale=0.1))

  for hw, c, depth in CONVFIRST_STAGES if "convfirst" in args.parts else ():
    shape = (args.batch, hw, hw, c)
    xs = [(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16),) for _ in range(2)]
    ps = tuple(convfirst_params(c) for _ in range(depth))

    def chain(x, block, ps=ps):
      for p in ps:
        x = block(x, p)
      return x

    ref = chain(xs[0][0].astype(jnp.float32), convfirst_block_reference)
    row = dict(shape=list(shape), blocks=depth, expansion=4,
               row_overhead=mg.row_overhead(*shape[:3]), variants={}, errors={})
    variants = {"xla": lambda x: chain(x, convfirst_block_reference),
                "blocks": lambda x: chain(x, lambda x, p: api.convfirst_block(
                    x, p, implementation="pallas")),
                "stage": lambda x: mg.convfirst_stage_forward(x, ps)}
    if 128 < c:  # the MLP kernel's other row count, for comparison with the default
      variants["stage, 64-row MLP CTAs"] = lambda x: mg.convfirst_stage_forward(
          x, ps, mlp_block_m=64)
    for name, fn in variants.items():
      fn = jax.jit(fn)
      try:
        row["errors"][name] = _rel(fn(*xs[0]), ref)
        row["variants"][name] = median_ms(fn, xs, args.iters, args.reps)
      except Exception as e:  # reported, not fatal
        row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    cf_stages.append(row)
    out["convfirst_stages"] = cf_stages
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  print(f"\n{out['device']}, jax {out['jax']}, {out['date']}, batch {args.batch}, bf16, ms")
  print("| shape | XLA | Mosaic, whole call | Mosaic kernel alone | variant | err | XLA err |")
  print("\n".join(lines))
  print("| MBConv block, E=4 | XLA | Mosaic (3 kernels + layout) | in the layout (best gconv) | "
        "x | err | XLA err | gconv |")
  for r in blocks:
    _table_row("x".join(map(str, r["shape"][1:])), r, None if "error" in r else [
        f"{r['xla_ms']:.3f}", f"{r['mosaic_ms']:.3f}", f"{r['rows_ms']:.3f}",
        f"{r['xla_ms'] / r['rows_ms']:.2f}", f"{r['mosaic_err']:.1e}", f"{r['xla_err']:.1e}",
        r["rows_best"]])
  print("| MBConv stage, E=4 | blocks | rows/pixel | XLA | Mosaic stage (best gconv) | x | err | "
        "XLA err | gconv |")
  for r in stages:
    name = "x".join(map(str, r["shape"][1:])) + f" | {r['blocks']}"
    _table_row(name, r, None if "error" in r else [
        f"{r['row_overhead']:.2f}", f"{r['xla_ms']:.3f}", f"{r['mosaic_ms']:.3f}",
        f"{r['xla_ms'] / r['mosaic_ms']:.2f}", f"{r['mosaic_err']:.1e}", f"{r['xla_err']:.1e}",
        r["mosaic_best"]])
  if cf_stages:
    print("| ConvFirst stage, E=4 | blocks | rows/pixel | XLA | block by block (XLA conv + "
          "Mosaic MLP) | padded-row stage | x XLA | stage err | XLA err |")
    for r in cf_stages:
      v, e = r["variants"], r["errors"]
      cell = lambda k: f"{v[k]:.3f}" if k in v else "failed"
      ratio = f"{v['xla'] / v['stage']:.2f}" if "xla" in v and "stage" in v else "-"
      err = lambda k: f"{e[k]:.1e}" if isinstance(e.get(k), float) else "-"
      print(f"| {'x'.join(map(str, r['shape'][1:]))} | {r['blocks']} | "
            f"{r['row_overhead']:.2f} | {cell('xla')} | {cell('blocks')} | {cell('stage')} | "
            f"{ratio} | {err('stage')} | {err('xla')} |")
    failed = {k: m for r in cf_stages for k, m in r["errors"].items() if isinstance(m, str)}
    for k, m in failed.items():
      print(f"  {k}: {m}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
