r"""Whole-training-step throughput: forward + backward + AdamW update, as ``fit`` runs it.

    python -m train.throughput --model convnext_tiny --batch-size 256 --image-size 224 \
        --block-impl xla --steps 30 [--json out.json]

Synthetic uint8 images already on the device (normalised inside the step, as image-folder
batches are), the TrainState packed into a few flat buffers as ``fit`` keeps it
(``--state-form tree``: the nested dict of every array), compute in --dtype (bfloat16 by default), float32 parameters and optimizer
state, the TrainState donated.  After --warmup steps (compilation included) it times
--steps steps one by one with block_until_ready and reports the median, then the same
number of steps dispatched back to back (one sync at the end), and prints one line.

XLA's own step varies between processes on Hopper: with XLA's default CUDA-graph command
buffers, ConvNeXt-T's XLA step at batch 128 took 59.3, 49.1 and 33.4 ms in three processes
on one H100 (2026-11-27), and 34.2, 33.6 and 34.3 ms in three with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=``; on an H200 (2026-11-28, batch 256) the
same flag made XLA's step slower, 75.0 vs 54.2 ms.  Compare implementations over several
processes; the result records the XLA_FLAGS it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

import pallas_kernels
from train import engine, parallel
from train.cli import json_object
from train.data import IMAGENET_MEAN, IMAGENET_STD


def measure(model: str, batch_size: int, image_size: int, *, block_impl=None,
            dtype: str = "bfloat16", steps: int = 30, warmup: int = 5, num_classes: int = 1000,
            drop_path: float = 0.0, model_kwargs: dict | None = None,
            state_form: str = "packed", num_devices: int | None = None,
            batch_sharding: bool = True) -> dict:
  mesh = parallel.make_mesh(parallel.first_devices(num_devices))
  parallel.check_batch_size(batch_size, mesh)
  net = engine.build_model(model, num_classes, block_impl=block_impl, dtype=dtype,
                           drop_path=drop_path, **(model_kwargs or {}))
  split = engine.SplitModel.from_model(net)
  tx, _ = engine.make_optimizer(split.params, lr=1e-3, total_steps=10_000, warmup_steps=100,
                                weight_decay=0.05, grad_clip=1.0)
  repl = parallel.replicated(mesh)
  state = jax.device_put(engine.init_state(split, tx), repl)
  kw = dict(num_classes=num_classes, label_smoothing=0.1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  if state_form == "packed":  # as fit runs it
    packer = engine.StatePacker(state)
    state = jax.jit(packer.pack, out_shardings=repl)(state)
    step_fn = engine.make_packed_train_step(packer, split, tx, **kw)
  elif state_form == "tree":
    step_fn = engine.make_train_step(split, tx, **kw)
  else:
    raise ValueError(f"state_form must be 'packed' or 'tree', got {state_form!r}")
  state_sh = jax.tree.map(lambda _: repl, state)
  batch_sh = parallel.batch_sharding(mesh)
  step = parallel.jit_in_mesh(step_fn, mesh, donate_argnums=0,
                              in_shardings=(state_sh, batch_sh, batch_sh),
                              out_shardings=(state_sh, repl))
  rng = np.random.default_rng(0)
  images = jax.device_put(
      rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8), batch_sh)
  labels = jax.device_put(rng.integers(0, num_classes, batch_size).astype(np.int32), batch_sh)

  t0 = time.perf_counter()
  with pallas_kernels.batch_sharding(batch_sharding):  # read while the step is traced
    state, metrics = step(state, images, labels)
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    state, metrics = step(state, images, labels)
  jax.block_until_ready((state, metrics))

  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, images, labels)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, images, labels)
  jax.block_until_ready((state, metrics))
  pipelined_s = (time.perf_counter() - t0) / steps
  loss = float(metrics["loss"])
  median = statistics.median(times)
  return {
      "model": model, "batch_size": batch_size, "image_size": image_size,
      "block_impl": block_impl or "auto", "dtype": dtype, "devices": mesh.size,
      "device_kind": jax.devices()[0].device_kind, "steps": steps,
      "median_step_ms": median * 1e3, "min_step_ms": min(times) * 1e3,
      "img_per_s": batch_size / median, "pipelined_img_per_s": batch_size / pipelined_s,
      "compile_s": compile_s, "final_loss": loss, "model_kwargs": model_kwargs or {},
      "state_form": state_form, "state_arrays": len(jax.tree.leaves(state)),
      "batch_sharding": batch_sharding,
      "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m train.throughput", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="convnext_tiny")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--block-impl", default="auto", choices=["auto", "xla", "pallas"])
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--steps", type=int, default=30, help="timed steps")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps first (with compile)")
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--drop-path", type=float, default=0.0)
  p.add_argument("--model-kwargs", type=json_object, default={},
                 help='more create_model arguments as JSON (as for python -m train), e.g. '
                 '\'{"depths": [1, 1, 2, 1]}\'')
  p.add_argument("--state-form", default="packed", choices=["packed", "tree"],
                 help="the TrainState as the jitted step's argument: packed into a few flat "
                 "buffers (as train.fit runs it) or the nested dict of every array")
  p.add_argument("--num-devices", type=int, default=None,
                 help="data-parallel over the first N devices (default: all)")
  p.add_argument("--no-batch-sharding", action="store_true",
                 help="do not run the Pallas kernels per device in a shard_map (each kernel "
                 "then runs on the whole gathered batch on every device; for comparison)")
  p.add_argument("--json", default=None, help="also write the result to this JSON file")
  a = p.parse_args(argv)
  r = measure(a.model, a.batch_size, a.image_size,
              block_impl=None if a.block_impl == "auto" else a.block_impl, dtype=a.dtype,
              steps=a.steps, warmup=a.warmup, num_classes=a.num_classes, drop_path=a.drop_path,
              model_kwargs=a.model_kwargs, state_form=a.state_form,
              num_devices=a.num_devices, batch_sharding=not a.no_batch_sharding)
  print(f"{r['model']} {r['block_impl']} {r['dtype']} batch {r['batch_size']} "
        f"{r['image_size']}x{r['image_size']} on {r['devices']}x {r['device_kind']}: "
        f"{r['img_per_s']:.0f} img/s train step (median {r['median_step_ms']:.2f} ms over "
        f"{r['steps']} steps; back-to-back {r['pipelined_img_per_s']:.0f} img/s; "
        f"compile {r['compile_s']:.1f} s; state {r['state_form']}, {r['state_arrays']} arrays"
        + ("" if r["batch_sharding"] else "; Pallas kernels on the gathered batch") + ")")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(r, f, indent=2)
  return r


if __name__ == "__main__":
  main()
