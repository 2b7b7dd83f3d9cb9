"""Per-kernel timing of the fused ConvNeXt block on the GPU, for tuning:
forward, backward kernel A, A+W, A+W+B at the ConvNeXt-T stage shapes, for a few tile
sets.  PYTHONPATH=. python3 -m pallas_kernels.convnext_block.profile_kernels"""

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.blocks import _time_ms
from pallas_kernels.convnext_block import pallas_triton, tuning

STAGES = ((56, 96), (28, 192), (14, 384), (7, 768))


def profile(batch=128, dtype=jnp.bfloat16, variants=None, parts=("fwd", "A", "W", "B"),
            stages=STAGES):
  rows = []
  for hw, c in stages:
    kx, kp, kg = jax.random.split(jax.random.key(c), 3)
    x = jax.random.normal(kx, (batch, hw, hw, c)).astype(dtype)
    p = tuning.reference_params(kp, c)
    g = jax.random.normal(kg, x.shape).astype(dtype)
    dps = jnp.ones((batch,), jnp.float32)
    base = tuning.get_tiles(c, dtype)
    for name, change in (variants or {"base": {}}).items():
      if callable(change):
        change = change(c)
      if change is None:
        continue
      tiles = dataclasses.replace(base, **change)
      row = dict(shape=f"{hw}x{hw}x{c}", variant=name)
      fns = {
          "fwd": jax.jit(lambda x, p, d: pallas_triton.forward(x, p, d, eps=1e-6, tiles=tiles, interpret=False)),
          "fwd_no_dwconv": jax.jit(lambda x, p, d: pallas_triton.forward(x, p, d, eps=1e-6, tiles=tiles, interpret=False, _parts="no_dwconv")),
          "fwd_no_mlp": jax.jit(lambda x, p, d: pallas_triton.forward(x, p, d, eps=1e-6, tiles=tiles, interpret=False, _parts="no_mlp")),
          "A": jax.jit(lambda x, p, d, g: pallas_triton.backward(x, p, d, g, eps=1e-6, tiles=tiles, interpret=False, stop_after="A")),
          "W": jax.jit(lambda x, p, d, g: pallas_triton.backward(x, p, d, g, eps=1e-6, tiles=tiles, interpret=False, stop_after="W")),
          "B": jax.jit(lambda x, p, d, g: pallas_triton.backward(x, p, d, g, eps=1e-6, tiles=tiles, interpret=False)),
      }
      for part in parts:
        args = (x, p, dps) if part.startswith("fwd") else (x, p, dps, g)
        t0 = time.time()
        try:
          row[part] = round(_time_ms(fns[part], [args], 10, 5), 4)
        except Exception as e:  # noqa: BLE001
          row[part] = f"ERR {type(e).__name__}: {str(e)[:200]}"
        row[part + "_s"] = round(time.time() - t0, 1)
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


if __name__ == "__main__":
  variants = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
  rows = profile(variants=variants)
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "profile.json"), "w") as f:
      json.dump(rows, f, indent=1)
