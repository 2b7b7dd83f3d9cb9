r"""Whole-model inference throughput, XLA vs Pallas blocks: images/s, bfloat16 compute,
float32 parameters, random inputs (the training step: ``python -m train.throughput``).

    PYTHONPATH=. python3 -m benchmarks.models --models convnext_tiny,convfirst_t \
        --batches 1,16,64,256 --impls xla,pallas --json out.json [--num-devices 2]

ConvFirstNet runs inference in its BatchNorm-folded form (``fold_batchnorm``).  Each
number is the median of ``--iters`` timed calls after warm-up, synchronised with
``block_until_ready`` (and, second, of ``--iters`` samples of 10 calls back to back); an
implementation that is not supported for a model prints n/a.  ``--impls`` takes xla,
pallas (every block that has a Pallas kernel uses it) and auto (``block_impl=None``: each
block picks what was measured faster; e.g. ConvFirstNet's folded ConvFirst and MBConv
stages run the Mosaic ``convfirst_stage`` / ``mbconv_stage`` on a Hopper GPU in bfloat16
where their padded-row layout is cheap enough -- from batch 16, convfirst_t's 56x56 and
14x14 stages in that layout and its 28x28 stage block by block with the Mosaic MLP kernel --
and XLA otherwise: its 7x7 stage, and every stage below 16 images, where the whole models
were measured slower with Pallas blocks; see ``pallas_kernels/convfirst_block/api.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import convfirst_jax as cj
from pallas_kernels.timing import median_seconds
from train import parallel


def build_inference(name: str, impl: str, dtype):
  impl = None if impl == "auto" else impl
  model = cj.create_model(name, num_classes=1000, block_impl=impl, dtype=dtype, rngs=0)
  model.eval()
  if isinstance(model, cj.ConvFirstNet):
    model = cj.fold_batchnorm(model, block_impl=impl)
  return model


def inference_throughput(name, impl, batch, image_size, dtype, iters, mesh=None):
  """(images/s, seconds per call synchronised, seconds per call back to back).

  The model runs through ``convfirst_jax.predictor``: its state is passed to the jitted
  function packed into a few flat buffers.  Passing the module itself made every call
  flatten the whole module on the host (0.4-0.9 ms per call at batch 1-4 on an H100 machine,
  2026-11-26), and passing its ``nnx.State`` (one array per weight) still cost ~1.3-1.5 ms
  of host time per synchronised call at batch 256, the same for XLA and Pallas blocks --
  time that compressed every synchronised ratio.  mesh: data-parallel over its devices
  (``predictor(model, mesh)``; the inputs are placed split over them before timing)."""
  fn = cj.predictor(build_inference(name, impl, dtype), mesh)
  keys = jax.random.split(jax.random.key(batch), 2)
  xs = [(jax.random.normal(k, (batch, image_size, image_size, 3), dtype),) for k in keys]
  if mesh is not None:
    xs = [(jax.device_put(x, fn.input_sharding),) for (x,) in xs]
  t = median_seconds(fn, arg_sets=xs, iters=iters)
  t_b2b = median_seconds(fn, arg_sets=xs, iters=iters, reps=10)
  return batch / t, t, t_b2b


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="convnext_tiny,convfirst_t")
  p.add_argument("--batches", default="1,16,64,256")
  p.add_argument("--impls", default="xla,pallas,auto",
                 help="block implementations to compare: xla, pallas (every block Pallas), "
                      "auto (block_impl=None: Pallas where it was measured faster)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--num-devices", type=int, default=1,
                 help="data-parallel over the first N devices (each batch split over them; "
                      "batches must be multiples of N)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  try:
    devices = parallel.first_devices(args.num_devices)
  except ValueError as e:
    p.error(f"--num-devices: {e}")
  bad = [b for b in args.batches.split(",") if int(b) % args.num_devices]
  if bad:
    p.error(f"--batches {','.join(bad)} not a multiple of --num-devices {args.num_devices}")
  mesh = None if args.num_devices == 1 else parallel.make_mesh(devices)
  device = devices[0].device_kind + (f" x{args.num_devices}" if mesh is not None else "")
  rows = []
  for name in args.models.split(","):
    for batch in [int(b) for b in args.batches.split(",")]:
      for impl in args.impls.split(","):
        row = dict(model=name, batch=batch, impl=impl, image_size=args.image_size,
                   dtype=args.dtype, device=device, xla_flags=os.environ.get("XLA_FLAGS", ""))
        try:
          ips, t, t_b2b = inference_throughput(name, impl, batch, args.image_size, dtype,
                                               args.iters, mesh)
          row.update(images_per_s=ips, ms=t * 1e3, back_to_back_images_per_s=batch / t_b2b,
                     back_to_back_ms=t_b2b * 1e3)
        except NotImplementedError as e:
          row.update(images_per_s=None, ms=None, note=str(e)[:80])
        rows.append(row)
        print(f"{name:<16} {impl:<7} batch {batch:>4}: "
              + (f"{row['images_per_s']:>10.0f} img/s  {row['ms']:.3f} ms  (back to back "
                 f"{row['back_to_back_images_per_s']:.0f} img/s)"
                 if row["ms"] is not None else "n/a  " + row["note"]), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  print(f"\nInference, {args.dtype}, {args.image_size}x{args.image_size}, {device}, "
        f"{time.strftime('%Y-%m-%d')}")
  print("img/s: one call synchronised at a time / calls back to back (10 per sync)")
  print(f"{'model':<16} {'batch':>5} " + " ".join(f"{i + ' img/s':>16}" for i in args.impls.split(",")))
  for name in args.models.split(","):
    for batch in [int(b) for b in args.batches.split(",")]:
      cells = []
      for impl in args.impls.split(","):
        r = next(r for r in rows if r["model"] == name and r["batch"] == batch and r["impl"] == impl)
        cells.append(f"{r['images_per_s']:>7.0f} / {r['back_to_back_images_per_s']:>6.0f}"
                     if r["images_per_s"] else f"{'n/a':>16}")
      print(f"{name:<16} {batch:>5} " + " ".join(cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())
