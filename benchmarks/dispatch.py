r"""Checks ``block_impl=None``'s choices for ConvFirstNet inference on this GPU: every stage
of the chosen models, at each batch, in every form it can run, with the form None picks.

    PYTHONPATH=. python3 -m benchmarks.dispatch --models convfirst_atto,convfirst_nano,convfirst_t \
        --batches 1,2,4,8,16,32,64 [--image-size 224] [--json out.jsonl]

A folded ConvFirstNet's stage (its residual blocks, after the downsampling layer) runs as
``pallas_kernels.convfirst_stage`` / ``mbconv_stage``, which with ``implementation=None``
choose between
- "xla": the reference blocks, compiled by XLA;
- "blocks" (ConvFirst stages only): one ``convfirst_block(implementation="pallas")`` per
  block (XLA's grouped conv + the fused Mosaic MLP kernel where it supports the width,
  else the single-launch Pallas-Triton kernel);
- "stage": the Mosaic padded-row form (``mosaic_gconv.convfirst_stage_forward`` /
  ``mbconv_stage_forward``: layout in once, three or two kernels per block, layout out once).
(MBConv's single-block Pallas-Triton kernel is slower than XLA everywhere it was measured,
so None never picks it and it is not timed here.)  For each (model, batch, stage) this times
every form that supports the shape (bfloat16, random input and folded parameters; the median
over ``--iters`` samples of one compiled program that chains ``--chain`` stage calls, each
output the next input, divided by ``--chain``: at these small batches one jitted call's
host dispatch is as long as the stage, so timing single calls measures the host), checks each
against the float32 reference chain, and reports which form None picks, the fastest form,
and the time None loses to it.  Rows are printed (and appended to ``--json``, one JSON
object per line) as they finish, so a run cut short keeps what it measured; the table is
printed last.  Needs a Hopper GPU for the Pallas forms (elsewhere only "xla" runs).  The
thresholds it tests live in ``pallas_kernels/convfirst_block/api.py``
(``MIN_STAGE_BATCH_FOR_PALLAS``, ``MIN_ROWS_FOR_PALLAS``, ``MOSAIC_STAGE_MAX_ROW_OVERHEAD``,
``MOSAIC_CONVFIRST_STAGE_*``).

A stage's time here is its GPU time alone.  Inside a whole model each Pallas call costs
more than that at small batches (host launches, XLA's fusions and command buffers split
around each custom call): on an H200 (2026-11-28) most stages ran faster in a Pallas form
even at batch 1 here, yet the folded models were slower with them at batches 1-8 -- which
is why None keeps small batches (``MIN_STAGE_BATCH_FOR_PALLAS``) in XLA.  Check a change to
these thresholds with ``python -m benchmarks.models --impls xla,auto`` as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp

from convfirst_jax import registry
from pallas_kernels.convfirst_block import api, mosaic_gconv
from pallas_kernels.convfirst_block.reference import (convfirst_block_reference,
                                                      mbconv_block_reference)
from pallas_kernels.timing import median_ms

from benchmarks.blocks_convfirst import make_params, norm_rel

FORMS = api.STAGE_FORMS


def stage_shapes(model: str, image_size: int):
  """(stage index, block type, (H, W, C), depth, expansion, k) of a registered ConvFirstNet."""
  cfg = registry.model_config(model)
  if "block_types" not in cfg:
    raise ValueError(f"{model} is not a ConvFirstNet (no block_types); "
                     f"try one of {registry.list_models('convfirst_*')}")
  exp = cfg["expansions"]
  exp = (exp,) * len(cfg["depths"]) if isinstance(exp, int) else tuple(exp)
  out = []
  for i, (kind, depth, c) in enumerate(zip(cfg["block_types"], cfg["depths"], cfg["dims"])):
    hw = image_size // (4 * 2 ** i)
    out.append((i + 1, kind, (hw, hw, c), depth, exp[i], cfg["kernel_size"]))
  return out


def forms(kind, params):
  """{form: function of x} for every form of this stage (``api.STAGE_FORMS``; the Pallas
  ones raise NotImplementedError, naming why, where they cannot run)."""
  ref = convfirst_block_reference if kind == "convfirst" else mbconv_block_reference

  def chain(x, block):
    for p in params:
      x = block(x, p)
    return x

  out = {"xla": lambda x: chain(x, ref)}
  if kind == "convfirst":
    out["blocks"] = lambda x: chain(
        x, lambda x, p: api.convfirst_block(x, p, implementation="pallas"))
    out["stage"] = lambda x: mosaic_gconv.convfirst_stage_forward(x, params)
  else:
    out["stage"] = lambda x: mosaic_gconv.mbconv_stage_forward(x, params)
  return out


def repeated(fn, n: int):
  """``fn`` applied ``n`` times in a row inside one compiled program (``x <- fn(x)``), so a
  stage of ~0.1 ms is timed on the GPU's timeline, kernel launches included, as it runs
  inside a compiled model -- not bounded by the host's dispatch of one jitted call."""
  return jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, x: fn(x), x))


def measure(model, batch, stage, kind, hwc, depth, e, k, args, key):
  kx, kp = jax.random.split(key)
  params = tuple(make_params(kind, kk, hwc[2], e, k) for kk in jax.random.split(kp, depth))
  xs = [(jax.random.normal(kk, (batch, *hwc), jnp.bfloat16),)
        for kk in jax.random.split(kx, 2)]
  fns = forms(kind, params)
  ref = jax.jit(fns["xla"])(xs[0][0].astype(jnp.float32))  # the reference chain in float32
  row = dict(model=model, batch=batch, stage=stage, kind=kind, shape=[batch, *hwc],
             blocks=depth, expansion=e, k=k, pixels=batch * hwc[0] * hwc[1],
             row_overhead=mosaic_gconv.row_overhead(batch, hwc[0], hwc[1]),
             none_picks=api.stage_form(kind, xs[0][0], params), ms={}, err={}, skipped={})
  t0 = time.perf_counter()
  for form, fn in fns.items():
    try:
      row["err"][form] = norm_rel(jax.jit(fn)(*xs[0]), ref)
      row["ms"][form] = median_ms(repeated(fn, args.chain), xs, args.iters, 1) / args.chain
    except NotImplementedError as exc:  # the form does not cover this call; says why
      row["skipped"][form] = str(exc)[:160]
    except Exception as exc:  # reported in the row, not fatal to the sweep
      row["skipped"][form] = f"{type(exc).__name__}: {str(exc)[:160]}"
  if row["ms"]:
    row["best"] = min(row["ms"], key=row["ms"].get)
    picked = row["ms"].get(row["none_picks"])
    row["none_loss"] = None if picked is None else picked / row["ms"][row["best"]] - 1
  row["seconds"] = time.perf_counter() - t0  # compiles included
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="convfirst_atto,convfirst_nano,convfirst_t")
  p.add_argument("--batches", default="1,2,4,8,16,32,64")
  p.add_argument("--stages", default=None,
                 help="comma-separated stage numbers (1-4) to time; default all")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--iters", type=int, default=15)
  p.add_argument("--chain", type=int, default=20,
                 help="stage calls chained in one compiled program per timed sample")
  p.add_argument("--tolerance", type=float, default=0.05,
                 help="None's pick is flagged when it is this much slower than the best form")
  p.add_argument("--json", default=None, help="append one JSON object per measured stage")
  args = p.parse_args(argv)
  try:
    batches = [int(b) for b in args.batches.split(",")]
    wanted = None if args.stages is None else {int(s) for s in args.stages.split(",")}
  except ValueError as e:
    p.error(f"--batches / --stages must be comma-separated integers: {e}")
  if min(batches) < 1:
    p.error("--batches must be positive")
  if args.image_size < 32 or args.image_size % 32:
    p.error(f"--image-size must be a positive multiple of 32 (the models' total stride), "
            f"got {args.image_size}")
  try:
    plans = {m: stage_shapes(m, args.image_size) for m in args.models.split(",")}
  except ValueError as e:
    p.error(str(e))
  device = jax.devices()[0].device_kind
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
  rows = []
  key = jax.random.key(0)
  for model, plan in plans.items():
    for batch in batches:
      for stage, kind, hwc, depth, e, k in plan:
        if wanted is not None and stage not in wanted:
          continue
        key, sub = jax.random.split(key)
        row = measure(model, batch, stage, kind, hwc, depth, e, k, args, sub)
        row.update(device=device, date=date)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
  print(f"\nConvFirstNet stages, folded inference, bf16, {args.image_size}x{args.image_size} "
        f"input, {device}, {date}; ms per stage (all its blocks)")
  print("| model | batch | stage | H x W x C x blocks | rows/px | " + " | ".join(FORMS)
        + " | None picks | best | None loses |")
  print("|---" * (8 + len(FORMS)) + "|")
  flagged = 0
  for r in rows:
    loss = r.get("none_loss")
    bad = loss is not None and loss > args.tolerance
    flagged += bad
    cells = [f"{r['ms'][f]:.3f}" if f in r["ms"] else "-" for f in FORMS]
    print(f"| {r['model']} | {r['batch']} | {r['stage']} ({r['kind']}) | "
          f"{'x'.join(map(str, r['shape'][1:]))}x{r['blocks']} | {r['row_overhead']:.2f} | "
          + " | ".join(cells) + f" | {r['none_picks']} | {r.get('best', '-')} | "
          + ("-" if loss is None else f"{100 * loss:.0f}%" + (" **" if bad else "")) + " |")
  print(f"\n{flagged} of {len(rows)} stages: None's pick more than "
        f"{100 * args.tolerance:.0f}% slower than the best form (marked **)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
