"""Where the GPU time of a ConvNeXt block or a whole model goes: per-kernel device time from
a ``jax.profiler`` trace, summed by kernel name and printed largest first.

    PYTHONPATH=. python3 -m benchmarks.kernel_profile block --shape 128,56,56,96 --impl auto
    PYTHONPATH=. python3 -m benchmarks.kernel_profile model --model convnext_tiny --batch 256 \\
        --mode train --impl auto --json out.json

``block``: one ConvNeXt block's forward + backward (gradients of x and the parameters, the
drop-path scale held constant, as in training; ``--forward-only`` for the forward), with
``--impl`` xla | auto (``implementation=None``) | pallas.  ``model``: a registered model's
inference call (ConvFirstNet with BatchNorm folded) or its whole training step (forward,
backward, AdamW), with ``block_impl`` = ``--impl``.  Random data; ``--calls`` traced calls
after three warm-up calls; times are per call.  Kernel names are XLA's fusion names, the
Pallas kernels' names (``depthwise_conv``, ``anonymous_mosaic_gpu_kernel``, ...) and the
cuBLAS / cuDNN kernels'; after the per-kernel list comes a summary by kind
(``by_category``).  Needs a GPU (the trace's device planes).

First run on a GPU: `bash benchmarks/gpu_suite.sh profile`, H100 80GB HBM3, 2026-11-26
(raw `benchmarks/results/profile_*_session2.json`)."""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def kernel_times(planes, calls: int) -> tuple[dict[str, float], dict[str, int]]:
  """(microseconds per call, launches per call) by kernel name, from the GPU planes of a
  ``jax.profiler.ProfileData`` (memcpy lines left out)."""
  us, launches = collections.Counter(), collections.Counter()
  for plane in planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      name = line.name.lower()
      if "stream" not in name or "memcpy" in name:
        continue
      for ev in line.events:
        us[ev.name] += ev.duration_ns / (1e3 * calls)
        launches[ev.name] += 1
  return dict(us), {k: v // calls for k, v in launches.items()}


# The Pallas-Triton kernels' names (their pallas_call ``name=``); XLA may append "__<n>" to
# repeated ones.  The Mosaic GPU kernels all appear as "anonymous_mosaic_gpu_kernel".
PALLAS_TRITON_NAMES = frozenset((
    "batch_norm_sums", "batch_norm_bwd_sums", "convfirst_block_fwd",
    "convnext_block_bwd_dwconv", "convnext_block_bwd_tile", "convnext_block_bwd_weights",
    "convnext_block_fwd", "depthwise_conv", "depthwise_conv_wgrad",
    "depthwise_conv_wgrad_columns", "grouped_conv_wgrad", "layer_norm_bwd", "layer_norm_fwd",
    "mbconv_block_fwd"))


def category(name: str) -> str:
  """Which kind of kernel a trace name is: our Mosaic GPU or Pallas-Triton kernels, cuDNN
  convolutions, cuBLAS / XLA GEMMs, memory copies, XLA's other fusions, or other."""
  n = name.lower()
  if "mosaic_gpu" in n:
    return "Mosaic GPU kernels"
  if n.split("__")[0] in PALLAS_TRITON_NAMES:
    return "Pallas-Triton kernels"
  if any(t in n for t in ("xmma_fprop", "xmma_dgrad", "xmma_wgrad", "wgrad2d", "convolve",
                          "cudnn")):
    return "cuDNN convolutions"
  if n.startswith(("nvjet", "gemm_fusion", "cutlass")) or "gemm" in n:
    return "GEMMs (cuBLAS, XLA's GEMM fusions)"
  if "memcpy" in n or "memset" in n:
    return "memory copies"
  if "fusion" in n or n.startswith(("loop_", "input_", "wrapped_")):
    return "XLA fusions (elementwise, reductions, transposes)"
  return "other"


def by_category(us: dict[str, float], launches: dict[str, int],
                small_us: float = 10.0) -> list[dict]:
  """Per ``category``: microseconds and launches per call, and how many of those launches
  average under ``small_us`` (launch-bound kernels), largest time first."""
  out: dict[str, dict] = {}
  for name, t in us.items():
    row = out.setdefault(category(name), dict(us=0.0, launches=0, small_launches=0))
    row["us"] += t
    row["launches"] += launches[name]
    if launches[name] and t / launches[name] < small_us:
      row["small_launches"] += launches[name]
  return [dict(category=k, **v) for k, v in sorted(out.items(), key=lambda kv: -kv[1]["us"])]


def trace(fn: Callable, args: tuple, calls: int = 5, carry: bool = False):
  """Runs ``fn(*args)`` three times, then traces ``calls`` more; returns ``kernel_times``.
  ``carry``: the first result replaces the first argument each call (a train step's
  state, donated)."""
  from jax.profiler import ProfileData

  def run(args):
    out = fn(*args)
    jax.block_until_ready(out)
    return (out[0], *args[1:]) if carry else args
  for _ in range(3):
    args = run(args)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(calls):
      args = run(args)
    jax.profiler.stop_trace()
    paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no trace under {d}")
    planes = ProfileData.from_file(paths[0]).planes
    times = kernel_times(planes, calls)
  if not times[0]:
    raise RuntimeError("the trace holds no GPU kernels (is this a GPU backend? "
                       f"jax.default_backend() = {jax.default_backend()!r})")
  return times


def _block_fn(shape, impl, forward_only):
  from pallas_kernels.convnext_block import api, tuning
  n, h, w, c = shape
  kx, kp, kg, kd = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, shape, jnp.float32).astype(jnp.bfloat16)
  p = tuning.reference_params(kp, c)
  d = (jax.random.uniform(kd, (n,)) > 0.1).astype(jnp.float32) / 0.9
  g = jax.random.normal(kg, shape, jnp.float32).astype(jnp.bfloat16)
  impl = None if impl == "auto" else impl
  f = lambda x, p: api.convnext_block(x, p, d, implementation=impl)
  if forward_only:
    return jax.jit(f), (x, p), False

  def run(x, p, g):
    y, vjp = jax.vjp(f, x, p)
    return y, vjp(g)
  return jax.jit(run), (x, p, g), False


def _model_fn(name, batch, image_size, impl, mode):
  if mode == "inference":
    from flax import nnx
    from benchmarks.models import build_inference
    model = build_inference(name, impl, jnp.bfloat16)
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, 3), jnp.bfloat16)
    return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)), (state, x), False
  from train import engine
  from train.data import IMAGENET_MEAN, IMAGENET_STD
  net = engine.build_model(name, 1000, block_impl=None if impl == "auto" else impl,
                           dtype="bfloat16", drop_path=0.0)
  split = engine.SplitModel.from_model(net)
  tx, _ = engine.make_optimizer(split.params, lr=1e-3, total_steps=10_000, warmup_steps=100,
                                weight_decay=0.05, grad_clip=1.0)
  state = engine.init_state(split, tx)
  packer = engine.StatePacker(state)  # the state packed, as train.fit keeps it
  step = jax.jit(engine.make_packed_train_step(packer, split, tx, num_classes=1000,
                                               label_smoothing=0.1, mean=IMAGENET_MEAN,
                                               std=IMAGENET_STD),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, image_size, image_size, 3), np.uint8))
  labels = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
  return step, (jax.jit(packer.pack)(state), images, labels), True


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="what", required=True)
  b = sub.add_parser("block", help="one ConvNeXt block")
  b.add_argument("--shape", default="128,56,56,96", help="N,H,W,C (bfloat16)")
  b.add_argument("--forward-only", action="store_true")
  m = sub.add_parser("model", help="a whole model")
  m.add_argument("--model", default="convnext_tiny")
  m.add_argument("--batch", type=int, default=256)
  m.add_argument("--image-size", type=int, default=224)
  m.add_argument("--mode", choices=("inference", "train"), default="inference")
  for p in (b, m):
    p.add_argument("--impl", choices=("xla", "auto", "pallas"), default="auto")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=40, help="kernels printed")
    p.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    raise SystemExit(f"benchmarks.kernel_profile needs a GPU backend, got "
                     f"{jax.default_backend()!r}")
  if args.what == "block":
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
      raise SystemExit(f"--shape must be N,H,W,C, got {args.shape!r}")
    fn, fargs, carry = _block_fn(shape, args.impl, args.forward_only)
    title = (f"ConvNeXt block {'x'.join(map(str, shape))} "
             f"{'forward' if args.forward_only else 'forward + backward'}, impl {args.impl}")
  else:
    fn, fargs, carry = _model_fn(args.model, args.batch, args.image_size, args.impl,
                                 args.mode)
    title = f"{args.model} {args.mode}, batch {args.batch}, impl {args.impl}"
  us, launches = trace(fn, fargs, args.calls, carry)
  device = jax.devices()[0].device_kind
  total = sum(us.values())
  print(f"{title}, bfloat16, {device}, {datetime.date.today().isoformat()}: "
        f"{total / 1e3:.3f} ms of kernels per call ({len(us)} kernel names)")
  for name, t in sorted(us.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {t:9.1f} us {100 * t / total:5.1f}%  x{launches[name]:<3d} {name[:90]}")
  cats = by_category(us, launches)
  print(f"By kind ({sum(launches.values())} launches per call; 'small': under 10 us each):")
  for row in cats:
    print(f"  {row['us']:9.1f} us {100 * row['us'] / total:5.1f}%  x{row['launches']:<4d} "
          f"({row['small_launches']} small)  {row['category']}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(title=title, device=device, date=datetime.date.today().isoformat(),
                     total_us=total, kernels=[dict(name=k, us=v, launches=launches[k])
                                              for k, v in sorted(us.items(),
                                                                 key=lambda kv: -kv[1])],
                     categories=cats),
                fh, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
