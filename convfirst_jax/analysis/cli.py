"""``python -m convfirst_jax.analysis``: waterline analysis and efficiency-gap plots.

    python -m convfirst_jax.analysis --model convnext_tiny --batch 256 --device h100 \\
        [--dtype bfloat16] [--measure] [--measure-ceilings] [--plot out.png] [--json out.json]

Prints, per block group (stem, downsample, residual block, head), FLOPs, minimum DRAM
bytes fused and unfused, operational intensity and the two roofline floors, then the
model's waterline for both partitions.  ``--measure`` also times every block group and the
whole forward pass on the current GPU (XLA and Pallas) and prints computational efficiency
= fused floor / measured time.

Exit status: 0 on success; 2 for bad arguments, and when ``--measure`` or
``--measure-ceilings`` was asked for but no GPU is present (the analytic part is still
printed; ``--allow-cpu`` measures on the CPU instead, which is only useful for testing).
"""

from __future__ import annotations

import argparse
import json
import sys

from convfirst_jax.analysis.devices import DEVICES, get_device, measure_ceilings
from convfirst_jax.analysis.waterline import Waterline, analyze

DTYPES = ("bfloat16", "float16", "float32")


def build_model(name: str, *, num_classes: int = 1000, dtype: str = "bfloat16",
                training_form: bool = False, abstract: bool = True):
  """The model to analyse: ConvFirstNet in its folded inference form unless
  ``training_form``; abstract (``nnx.eval_shape``, no memory) unless measuring."""
  import jax.numpy as jnp
  from flax import nnx

  from convfirst_jax.convfirst import ConvFirstNet, fold_batchnorm
  from convfirst_jax.registry import create_model

  dt = jnp.dtype(dtype)
  make = lambda **kw: create_model(name, num_classes=num_classes, dtype=dt, **kw)
  model = nnx.eval_shape(make)
  fold = isinstance(model, ConvFirstNet) and not training_form
  if abstract:
    return nnx.eval_shape(lambda: make(folded=True)) if fold else model
  model = make()
  model.eval()
  if fold:
    model = fold_batchnorm(model)
    model.eval()
  return model


def _fmt_t(s):
  return "n/a" if s is None else f"{s * 1e6:.1f}"


def _fmt_eff(floor, s):
  return "n/a" if s is None else f"{floor / s:.1%}"


def format_report(w: Waterline, block_times=None, model_times=None, layers: bool = False,
                  form: str = "") -> str:
  d = w.device
  lines = [
      f"{w.model}{f' ({form})' if form else ''}: batch {w.batch}, {w.image_size}x{w.image_size}, "
      f"{w.dtype} activations and weights",
      f"device: {d.name}: {d.peak(w.dtype) / 1e12:.1f} TFLOP/s, "
      f"{d.dram_bandwidth / 1e12:.3f} TB/s (ridge {d.peak(w.dtype) / d.dram_bandwidth:.0f} "
      f"FLOP/B; {d.source})",
      "floors: fused = the block group as one kernel (input, weights, output through DRAM); "
      "unfused = one kernel per layer",
  ]
  measured = bool(block_times)
  head = (f"{'block':<22} {'kind':<10} {'in shape':<18} {'GFLOP':>8} {'fused MB':>9} "
          f"{'unfus MB':>9} {'I fused':>8} {'I unfus':>8} {'fused us':>9} {'unfus us':>9}")
  if measured:
    head += f" {'XLA us':>9} {'Pallas us':>9} {'eff XLA':>8} {'eff Pal':>8}"
  lines += [head, "-" * len(head)]
  tot_x = tot_p = 0.0
  have_x = have_p = measured
  for b in w.blocks:
    shape = "x".join(str(s) for s in b.count.in_shape)
    row = (f"{b.name:<22} {b.kind:<10} {shape:<18} {b.count.flops / 1e9:>8.2f} "
           f"{b.fused.min_bytes / 1e6:>9.2f} {b.unfused_bytes / 1e6:>9.2f} "
           f"{b.fused.intensity:>8.1f} {b.unfused_intensity:>8.1f} "
           f"{b.fused.time_s * 1e6:>9.1f} {b.unfused_s * 1e6:>9.1f}")
    if measured:
      t = block_times.get(b.name, {})
      tx = t["xla"].seconds if "xla" in t else None
      # Groups without a Pallas kernel (stem, downsample, head) run XLA in a Pallas model.
      tp = t["pallas"].seconds if "pallas" in t else (tx if not b.residual else None)
      if not b.residual and "pallas" not in t:
        tp_label = "(xla)"
      else:
        tp_label = _fmt_t(tp)
      row += (f" {_fmt_t(tx):>9} {tp_label:>9} {_fmt_eff(b.fused.time_s, tx):>8} "
              f"{_fmt_eff(b.fused.time_s, tp) if b.residual else '':>8}")
      if tx is None:
        have_x = False
      else:
        tot_x += tx
      if tp is None:
        have_p = False
      else:
        tot_p += tp
    lines.append(row)
    if layers:
      for l in b.layers:
        lines.append(f"  {l.name:<36} {l.kind:<10} {l.flops / 1e9:>8.3f} GFLOP "
                     f"{l.min_bytes / 1e6:>9.2f} MB  I {l.intensity:>7.1f}  "
                     f"{l.time_s * 1e6:>8.1f} us ({l.bound})")
  lines.append("-" * len(head))
  lines.append(
      f"total: {w.params:,} params, {w.macs / 1e9:.3f} G MACs, {w.flops / 1e9:.2f} GFLOP, "
      f"min bytes fused {w.fused_bytes / 1e9:.3f} GB / unfused {w.unfused_bytes / 1e9:.3f} GB")
  lines.append(
      f"waterline: fused {w.fused_s * 1e3:.3f} ms ({w.batch / w.fused_s:,.0f} img/s), "
      f"unfused {w.unfused_s * 1e3:.3f} ms ({w.batch / w.unfused_s:,.0f} img/s); "
      f"unfused / fused = {w.unfused_s / w.fused_s:.2f}x")
  if measured:
    for impl, ok, tot in (("xla", have_x, tot_x), ("pallas", have_p, tot_p)):
      label = "XLA" if impl == "xla" else "Pallas"
      if ok:
        lines.append(f"sum of block groups, {label}: {tot * 1e3:.3f} ms; efficiency "
                     f"{w.fused_s / tot:.1%} of the fused floor, {w.unfused_s / tot:.1%} "
                     f"of the unfused floor")
      else:
        lines.append(f"sum of block groups, {label}: n/a (some groups not measured)")
  if model_times:
    for impl, t in model_times.items():
      label = "XLA" if impl == "xla" else "Pallas"
      if t.seconds is None:
        lines.append(f"whole model forward, {label}: n/a ({t.note})")
      else:
        lines.append(f"whole model forward, {label}: {t.seconds * 1e3:.3f} ms "
                     f"({w.batch / t.seconds:,.0f} img/s); efficiency {w.fused_s / t.seconds:.1%} "
                     f"of the fused floor, {w.unfused_s / t.seconds:.1%} of the unfused floor")
  if measured:
    notes = sorted({t.note for bt in block_times.values() for t in bt.values() if t.note})
    for n in notes:
      lines.append(f"note: {n}")
  return "\n".join(lines)


def report_dict(w: Waterline, block_times=None, model_times=None, form: str = "") -> dict:
  out = w.to_dict()
  out["form"] = form
  if block_times:
    for b in out["blocks"]:
      t = block_times.get(b["name"], {})
      b["measured_s"] = {impl: x.seconds for impl, x in t.items()}
      b["measured_notes"] = {impl: x.note for impl, x in t.items() if x.note}
      b["efficiency"] = {impl: (b["fused"]["time_s"] / x.seconds if x.seconds else None)
                         for impl, x in t.items()}
  if model_times:
    out["model_measured_s"] = {impl: t.seconds for impl, t in model_times.items()}
    out["model_measured_notes"] = {impl: t.note for impl, t in model_times.items() if t.note}
    out["model_efficiency"] = {impl: (w.fused_s / t.seconds if t.seconds else None)
                               for impl, t in model_times.items()}
  return out


def _parser():
  p = argparse.ArgumentParser(prog="python -m convfirst_jax.analysis",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="convnext_tiny", help="a registered model name")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--device", default="h100",
                 help=f"ceilings from the datasheet table: {', '.join(DEVICES)}")
  p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
  p.add_argument("--training-form", action="store_true",
                 help="ConvFirstNet: analyse the BatchNorm training form, not the folded one")
  p.add_argument("--layers", action="store_true", help="also print every layer's floor")
  p.add_argument("--measure", action="store_true",
                 help="time every block group and the whole forward pass on the GPU")
  p.add_argument("--measure-ceilings", action="store_true",
                 help="measure peak FLOP/s and DRAM bandwidth here and use them as ceilings")
  p.add_argument("--impl", default="xla,pallas",
                 help="block implementations to time, comma separated (default xla,pallas)")
  p.add_argument("--iters", type=int, default=30, help="timed runs per kernel (median)")
  p.add_argument("--warmup", type=int, default=5, help="untimed runs after compilation")
  p.add_argument("--allow-cpu", action="store_true",
                 help="measure even without a GPU (slow; for testing the code path)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--plot", metavar="PNG",
                 help="efficiency-gap plot to PNG, roofline plot to PNG's *_roofline.png")
  p.add_argument("--json", metavar="PATH", help="write every number to a JSON file")
  p.add_argument("--list", action="store_true", help="list models and devices and exit")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.list:
    from convfirst_jax.registry import list_models
    print("models:", ", ".join(list_models()))
    for k, d in DEVICES.items():
      print(f"device {k}: {d.name}, {d.peak('bfloat16') / 1e12:.1f} TFLOP/s bf16, "
            f"{d.dram_bandwidth / 1e12:.3f} TB/s ({d.source})")
    return 0
  try:
    device = get_device(args.device)
    impls = tuple(i.strip() for i in args.impl.split(",") if i.strip())
    bad = [i for i in impls if i not in ("xla", "pallas")]
    if bad or not impls:
      raise ValueError(f"--impl takes xla and/or pallas, got {args.impl!r}")
    model = build_model(args.model, num_classes=args.num_classes, dtype=args.dtype,
                        training_form=args.training_form, abstract=True)
    from convfirst_jax.convfirst import ConvFirstNet
    form = ""
    if isinstance(model, ConvFirstNet):
      form = "BatchNorm training form" if args.training_form else "folded inference form"
    w = analyze(model, args.image_size, args.batch, device, args.dtype, name=args.model)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  status = 0
  wants_gpu = args.measure or args.measure_ceilings
  block_times = model_times = None
  if wants_gpu:
    import jax
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
      print(f"note: --measure / --measure-ceilings need a GPU; jax's backend here is "
            f"{backend!r}. Printing the analytic part only (pass --allow-cpu to measure on "
            f"this {backend} anyway, for testing).", file=sys.stderr)
      status = 2
    else:
      if args.measure_ceilings:
        print("measuring ceilings ...", file=sys.stderr)
        device = measure_ceilings(dtype=args.dtype)
        w = analyze(model, args.image_size, args.batch, device, args.dtype, name=args.model)
      if args.measure:
        from convfirst_jax.analysis.measure import measure_blocks, measure_model
        concrete = build_model(args.model, num_classes=args.num_classes, dtype=args.dtype,
                               training_form=args.training_form, abstract=False)
        in_shapes = {b.name: b.count.in_shape for b in w.blocks}
        import jax.numpy as jnp
        dt = jnp.dtype(args.dtype)
        block_times = measure_blocks(concrete, in_shapes, dt, impls=impls,
                                     warmup=args.warmup, iters=args.iters,
                                     progress=not args.no_progress)
        if not args.no_progress:
          print("timing the whole model ...", file=sys.stderr)
        model_times = measure_model(
            concrete, (args.batch, args.image_size, args.image_size, concrete.in_chans), dt,
            impls=impls, warmup=max(args.warmup // 2, 1), iters=max(args.iters // 2, 3))
  print(format_report(w, block_times, model_times, layers=args.layers, form=form))
  if args.plot:
    from convfirst_jax.analysis.plots import save_plots
    for p in save_plots(w, args.plot, block_times):
      print(f"wrote {p}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report_dict(w, block_times, model_times, form), f, indent=1)
    print(f"wrote {args.json}")
  return status
