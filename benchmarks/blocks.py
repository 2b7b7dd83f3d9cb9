"""Fused-block benchmarks: XLA vs Pallas, forward and forward+backward, against the
waterline floor max(FLOPs / peak, min_bytes / bandwidth) (``--ceilings``: the peak and
bandwidth measured on the GPU that runs it, or an H100's; benchmarks/ceilings.py).

    PYTHONPATH=. python3 -m benchmarks.blocks [--blocks convnext,convfirst,convfirst_train]
        [--batch 128] [--dtype bfloat16] [--iters 30] [--json out.json] [--tune]
        [--convnext-impl auto|pallas]

Each time is the median over ``--iters`` samples; a sample dispatches ``--reps`` calls
back to back (rotating between two random input sets, so inputs that fit in the 50 MB L2
are not always hot) and divides the wall time, synchronised with block_until_ready, by
``--reps``, after warm-up.  The Pallas result is checked against XLA in the same run
(max |a-b| / max |b| of y, and of dx and d fc1 for the backward).  The ConvNeXt rows'
"Pallas" column is ``implementation=None`` -- what ``block_impl="auto"`` models run -- unless
``--convnext-impl pallas`` forces the Pallas path (see ``convnext_cases``).

Blocks are ``BlockCase`` entries produced by ``CASES[name](batch, dtype)``; ConvFirst and
MBConv add an entry there with their own FLOP/byte counts.  Sweeps over alternative kernel
configs are not here: ``python -m benchmarks.blocks_convfirst --sweep`` (inference) and
``python -m benchmarks.blocks_convfirst_train --sweep`` (the grouped-conv layer) time them.
``--tune`` re-tunes the Pallas tile sets on this GPU first (tuning.retune; the winners are
cached in the JSON file named by $CONVFIRST_JAX_TUNING_CACHE) and then benchmarks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ceilings as ceilings_mod

# The floor's ceilings: the H100 constants until ``main`` resolves --ceilings (see
# benchmarks/ceilings.py: measured on any GPU other than that H100).
CEILINGS = ceilings_mod.H100


@dataclasses.dataclass
class BlockCase:
  name: str
  shape: tuple
  dtype: str
  make_inputs: Callable  # key -> (args tuple, cotangent)
  impls: dict  # impl name -> f(*args) -> y
  flops_fwd: float
  bytes_fwd: float
  flops_bwd: float  # backward alone
  bytes_bwd: float
  # grads of f's arguments -> (d x, d fc1 kernel, d conv kernel) for the error columns
  pick_grads: Callable = lambda g: (g[0], g[1].fc1_kernel, g[1].dw_kernel)

  def floor_ms(self, backward: bool) -> float:
    f = self.flops_fwd + (self.flops_bwd if backward else 0.0)
    b = self.bytes_fwd + (self.bytes_bwd if backward else 0.0)
    return CEILINGS.floor_s(f, b) * 1e3


def convnext_cases(batch: int, dtype, tiles=None, impl: str = "auto"):
  """ConvNeXt-T's four stage blocks.  The "Pallas" column runs ``implementation=None``
  (``impl="auto"``: what a model's ``block_impl="auto"`` gets -- the tile table's choice,
  e.g. XLA's block with the Pallas depthwise conv when differentiated at C=768) or
  ``implementation="pallas"`` (``impl="pallas"``: the Pallas path forced, the Triton
  backward at C=768; the tables before 2026-11-27's fifth session used this)."""
  if impl not in ("auto", "pallas"):
    raise ValueError(f"impl must be 'auto' or 'pallas', got {impl!r}")
  implementation = None if impl == "auto" else "pallas"
  from pallas_kernels.convnext_block import api
  from pallas_kernels.convnext_block.tuning import reference_params

  cases = []
  for hw, c in ((56, 96), (28, 192), (14, 384), (7, 768)):
    shape = (batch, hw, hw, c)
    m = batch * hw * hw
    isz = jnp.dtype(dtype).itemsize
    hidden = 4 * c
    wbytes = (49 * c + 2 * c * hidden) * isz + (5 * c + hidden) * 4

    def make_inputs(key, shape=shape, c=c):
      kx, kp, kg, kd = jax.random.split(key, 4)
      x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
      p = reference_params(kp, c)
      dps = (jax.random.uniform(kd, (shape[0],)) > 0.1).astype(jnp.float32) / 0.9
      g = jax.random.normal(kg, shape, jnp.float32).astype(dtype)
      return (x, p, dps), g

    impls = {
        "xla": lambda x, p, d: api.convnext_block(x, p, d, implementation="xla"),
        "pallas": lambda x, p, d, tiles=tiles: api.convnext_block(
            x, p, d, implementation=implementation, tiles=tiles),
    }
    flops = 2.0 * m * (49 * c + 2 * c * hidden)
    cases.append(BlockCase(
        name=f"convnext {hw}x{hw}x{c}", shape=shape, dtype=jnp.dtype(dtype).name,
        make_inputs=make_inputs, impls=impls,
        flops_fwd=flops, bytes_fwd=2 * m * c * isz + wbytes,
        # backward: dx and the weight grads are each one more pass of the same size
        flops_bwd=2 * flops, bytes_bwd=3 * m * c * isz + 2 * wbytes))
  return cases


# ----------------------------------------------------------------- ConvFirst / MBConv (issue #6)
# Inference (BatchNorm-folded) blocks: run with --blocks convfirst --no-backward; training
# blocks (batch statistics; convfirst_block_train / mbconv_block_train): --blocks convfirst_train.
# The sweep over kernel configs and GPU correctness checks live in benchmarks.blocks_convfirst.


def convfirst_cases(batch: int, dtype, tiles=None):
  del tiles
  from benchmarks.blocks_convfirst import SHAPES, floor_s, make_params
  from pallas_kernels.convfirst_block import api

  cases = []
  for name, kind, h, w, c, e in SHAPES:
    fn = api.convfirst_block if kind == "convfirst" else api.mbconv_block
    shape = (batch, h, w, c)

    def make_inputs(key, shape=shape, kind=kind, c=c, e=e):
      kx, kp, kg = jax.random.split(key, 3)
      x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
      return (x, make_params(kind, kp, c, e)), jax.random.normal(kg, shape).astype(dtype)

    _, flops, bytes_ = floor_s(kind, batch, h, w, c, e, itemsize=jnp.dtype(dtype).itemsize)
    cases.append(BlockCase(
        name=name, shape=shape, dtype=jnp.dtype(dtype).name, make_inputs=make_inputs,
        impls={impl: (lambda x, p, fn=fn, impl=impl: fn(x, p, implementation=impl))
               for impl in ("xla", "pallas")},
        flops_fwd=flops, bytes_fwd=bytes_, flops_bwd=0.0, bytes_bwd=0.0))
  return cases


def convfirst_train_cases(batch: int, dtype, tiles=None):
  """Training-form ConvFirst / MBConv blocks (BatchNorm with batch statistics, float32
  parameters), the model's modules in train mode: "pallas" runs a ConvFirst block as
  ``pallas_kernels.convfirst_block_train`` (BatchNorms folded from batch statistics, Mosaic
  pointwise kernels, XLA's grouped conv) and an MBConv block as
  ``pallas_kernels.mbconv_block_train`` (BatchNorms with Pallas reductions, XLA's grouped
  conv and GEMMs).  Floors: the fused block's FLOPs and
  minimum bytes (as the inference rows; BatchNorm statistics would cost a real fused kernel
  extra passes), backward twice the FLOPs, reading x and dy and writing dx."""
  del tiles
  from benchmarks.blocks_convfirst import SHAPES, floor_s
  from benchmarks.blocks_convfirst_train import training_block

  cases = []
  for name, kind, h, w, c, e in SHAPES:
    shape = (batch, h, w, c)
    isz = jnp.dtype(dtype).itemsize
    applies, params, rest = training_block(kind, c, e, dtype)

    def make_inputs(key, shape=shape, params=params, rest=rest):
      kx, kg = jax.random.split(key)
      x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
      return (x, params, rest), jax.random.normal(kg, shape).astype(dtype)

    _, flops, bytes_ = floor_s(kind, batch, h, w, c, e, itemsize=isz)
    cases.append(BlockCase(
        name=f"train {name}", shape=shape, dtype=jnp.dtype(dtype).name,
        make_inputs=make_inputs,
        impls=applies,
        flops_fwd=flops, bytes_fwd=bytes_, flops_bwd=2 * flops,
        bytes_bwd=bytes_ + batch * h * w * c * isz,
        pick_grads=lambda g: (g[0], g[1]["fc1"]["kernel"][...],
                              g[1]["conv_group"]["kernel"][...])))
  return cases


CASES = {"convnext": convnext_cases, "convfirst": convfirst_cases,
         "convfirst_train": convfirst_train_cases}


def _time_ms(fn, arg_sets, iters: int, reps: int) -> float:
  for i in range(3):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = None
    for r in range(reps):
      out = fn(*arg_sets[r % len(arg_sets)])
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return float(np.median(samples)) * 1e3


def _rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32))
  b = np.asarray(jnp.asarray(b, jnp.float32))
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _fwd_bwd(f):
  """y and the gradients of x and the parameters; the third argument (drop-path scale or
  BatchNorm state) is held constant, as in a training step."""
  def run(x, p, d, g):
    y, vjp = jax.vjp(lambda x, p: f(x, p, d), x, p)
    return y, vjp(g)
  return jax.jit(run)


def run_case(case: BlockCase, iters: int, reps: int, backward: bool = True) -> dict:
  sets = [case.make_inputs(jax.random.key(i)) for i in range(2)]
  fwd_sets = [a for a, _ in sets]
  bwd_sets = [(*a, g) for a, g in sets]
  row = dict(block=case.name, shape=list(case.shape), dtype=case.dtype,
             floor_fwd_ms=case.floor_ms(False), floor_fwd_bwd_ms=case.floor_ms(True))
  outs = {}
  for impl, f in case.impls.items():
    fj = jax.jit(f)
    try:
      row[f"{impl}_fwd_ms"] = _time_ms(fj, fwd_sets, iters, reps)
      outs[impl] = (fj(*fwd_sets[0]),)
      if backward:
        fb = _fwd_bwd(f)
        row[f"{impl}_fwd_bwd_ms"] = _time_ms(fb, bwd_sets, iters, reps)
        y, grads = fb(*bwd_sets[0])
        outs[impl] = (y, *case.pick_grads(grads))
    except Exception as e:  # noqa: BLE001 - report and keep going
      row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"{case.name} {impl}: {row[f'{impl}_error']}", flush=True)
  if "xla" in outs and "pallas" in outs:
    names = ["y", "dx", "dfc1", "ddw"]
    for nm, a, b in zip(names, outs["pallas"], outs["xla"]):
      row[f"max_rel_err_{nm}"] = _rel_err(a, b)
  for kind in ("fwd", "fwd_bwd"):
    x, p = row.get(f"xla_{kind}_ms"), row.get(f"pallas_{kind}_ms")
    if x and p:
      row[f"speedup_{kind}"] = x / p
      row[f"efficiency_{kind}"] = row[f"floor_{kind}_ms"] / p
  return row


def print_table(rows):
  hdr = (f"{'block':<28}{'XLA fwd':>9}{'Pallas':>9}{'x':>6}{'floor':>7}{'eff':>6}"
         f"{'XLA f+b':>9}{'Pallas':>9}{'x':>6}{'floor':>7}{'eff':>6}{'err y':>9}{'err dx':>9}")
  print(hdr)
  def f(v, fmt):
    width = int(fmt.split(".")[0])
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a".rjust(width)
  for r in rows:
    print(f"{r['block']:<28}{f(r.get('xla_fwd_ms'), '9.3f')}{f(r.get('pallas_fwd_ms'), '9.3f')}"
          f"{f(r.get('speedup_fwd'), '6.2f')}{f(r['floor_fwd_ms'], '7.3f')}"
          f"{f(r.get('efficiency_fwd'), '6.2f')}"
          f"{f(r.get('xla_fwd_bwd_ms'), '9.3f')}{f(r.get('pallas_fwd_bwd_ms'), '9.3f')}"
          f"{f(r.get('speedup_fwd_bwd'), '6.2f')}{f(r['floor_fwd_bwd_ms'], '7.3f')}"
          f"{f(r.get('efficiency_fwd_bwd'), '6.2f')}"
          f"{f(r.get('max_rel_err_y'), '9.1e')}{f(r.get('max_rel_err_dx'), '9.1e')}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--blocks", default="convnext",
                  help=f"comma-separated, from {sorted(CASES)} (convfirst: inference only, "
                       "use --no-backward)")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--no-backward", action="store_true")
  ap.add_argument("--convnext-impl", choices=["auto", "pallas"], default="auto",
                  help="what the ConvNeXt rows' Pallas column runs: implementation=None "
                       "(auto, the library default) or \"pallas\" (forced; the Triton "
                       "backward at C=768)")
  ap.add_argument("--tune", action="store_true",
                  help="re-tune the Pallas tiles on this GPU first (cached to JSON)")
  ap.add_argument("--json", default=None)
  ceilings_mod.add_argument(ap)
  args = ap.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0].device_kind
  global CEILINGS
  CEILINGS = ceilings_mod.resolve(args.ceilings)
  meta = dict(device=device, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
              batch=args.batch, dtype=args.dtype, jax=jax.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""), convnext_impl=args.convnext_impl,
              peak_flops=CEILINGS.flops, peak_bytes_per_s=CEILINGS.bytes_per_s,
              ceilings=CEILINGS.source)
  print(f"# {meta}", flush=True)
  from pallas_kernels.convnext_block import tuning
  rows = []
  unknown = set(args.blocks.split(",")) - set(CASES)
  if unknown:
    ap.error(f"unknown --blocks {sorted(unknown)}; choose from {sorted(CASES)}")
  for name in args.blocks.split(","):
    kw = dict(impl=args.convnext_impl) if name == "convnext" else {}
    for case in CASES[name](args.batch, dtype, **kw):
      if args.tune and name == "convnext":  # tune right before each shape's benchmark
        best, _ = tuning.retune(case.shape, dtype, iters=5)
        print(f"TUNED {case.name}: {best}", flush=True)
      row = run_case(case, args.iters, args.reps, backward=not args.no_backward)
      if name == "convnext":
        row["tiles"] = tuning.get_tiles(case.shape[-1], dtype).to_json()
      rows.append(row)
      print(json.dumps(row), flush=True)
  print_table(rows)
  print(CEILINGS.describe())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
