"""``python -m convfirst_jax.summary``: a model's parameters, multiply-adds and minimum DRAM
traffic per stage, from shapes alone (no weights are allocated)."""

from __future__ import annotations

import argparse
import sys

from flax import nnx

from convfirst_jax.analysis import summary_rows
from convfirst_jax.registry import create_model, list_models


def _fmt(n: float, unit: str = "") -> str:
  for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= div:
      return f"{n / div:.3f} {suffix}{unit}"
  return f"{n:.0f} {unit}".rstrip()


def summary_table(name: str, image_size: int = 224, batch: int = 1,
                  num_classes: int = 1000, itemsize: int = 2) -> str:
  model = nnx.eval_shape(lambda: create_model(name, num_classes=num_classes))
  rows = summary_rows(model, image_size, batch, itemsize)
  head = (f"{'part':<10} {'blocks':>6} {'params':>14} {'MACs':>12} "
          f"{'unfused bytes':>15} {'fused bytes':>13}")
  lines = [f"{name}: {image_size}x{image_size}, batch {batch}, {num_classes} classes, "
           f"activations and weights at {itemsize} bytes", head, "-" * len(head)]
  tot = dict(blocks=0, params=0, macs=0, unfused_bytes=0, fused_bytes=0)
  for part, r in rows.items():
    lines.append(f"{part:<10} {r['blocks']:>6} {r['params']:>14,} {_fmt(r['macs']):>12} "
                 f"{_fmt(r['unfused_bytes'], 'B'):>15} {_fmt(r['fused_bytes'], 'B'):>13}")
    for k in tot:
      tot[k] += r[k]
  lines.append("-" * len(head))
  lines.append(f"{'total':<10} {tot['blocks']:>6} {tot['params']:>14,} {_fmt(tot['macs']):>12} "
               f"{_fmt(tot['unfused_bytes'], 'B'):>15} {_fmt(tot['fused_bytes'], 'B'):>13}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="convnext_tiny",
                 help="registered name, or 'all' (see --list)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--list", action="store_true", help="list the registered models and exit")
  args = p.parse_args(argv)
  if args.list:
    print("\n".join(list_models()))
    return 0
  names = list_models() if args.model == "all" else [args.model]
  try:
    for name in names:
      print(summary_table(name, args.image_size, args.batch, args.num_classes))
      print()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
