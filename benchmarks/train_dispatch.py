"""Host cost of calling a jitted train step, by TrainState form: nnx.State vs plain dicts.

    PYTHONPATH=. python3 -m benchmarks.train_dispatch [--model convnext_tiny] [--json out.json]

Builds the model's TrainState (parameters, batch statistics, RNG state, AdamW moments) both
as ``nnx.State`` objects (``nnx.split`` output, what the TrainState held before 2026-11-25)
and as plain nested dicts (``train.engine``'s form now), and times on this host:

* flattening + unflattening the state pytree (what every jitted call does to its arguments
  and results);
* the wall time to dispatch a donated identity step on the state (returns before the device
  finishes; median of 50), i.e. the host time per training step that is not compute;

and the same for the state packed into a few flat buffers (``engine.StatePacker``, how
``train.fit`` passes it since 2026-11-26).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from train import engine


def _flatten_ms(tree, n=50):
  t0 = time.perf_counter()
  for _ in range(n):
    leaves, treedef = jax.tree.flatten(tree)
    jax.tree.unflatten(treedef, leaves)
  return (time.perf_counter() - t0) / n * 1e3


def _dispatch_ms(tree, n=50):
  f = jax.jit(lambda s: jax.tree.map(lambda a: a, s), donate_argnums=0)
  tree = f(tree)
  jax.block_until_ready(tree)
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    tree = f(tree)
    times.append(time.perf_counter() - t0)
    jax.block_until_ready(tree)
  return statistics.median(times) * 1e3


def measure(model: str) -> dict:
  net = engine.build_model(model, 1000, block_impl="xla", dtype="bfloat16")
  split = engine.SplitModel.from_model(net)
  tx, _ = engine.make_optimizer(split.params, lr=1e-3, total_steps=100, warmup_steps=10,
                                weight_decay=0.05, grad_clip=1.0)
  pure = engine.init_state(split, tx)
  states = [c.from_pure(s) for c, s in zip(split.codecs, (pure["params"], pure["batch_stats"],
                                                          pure["rest"]))]
  # AdamW moments mirror the params tree: nnx.State when the params are nnx.State.
  tx_nnx, _ = engine.make_optimizer(states[0], lr=1e-3, total_steps=100, warmup_steps=10,
                                    weight_decay=0.05, grad_clip=1.0)
  as_nnx = dict(pure, params=states[0], batch_stats=states[1], rest=states[2],
                opt_state=tx_nnx.init(states[0]))
  out = {"model": model, "leaves": len(jax.tree.leaves(pure)),
         "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  packed = engine.StatePacker(pure).pack(pure)   # what train.fit passes its steps now
  out["packed_arrays"] = len(jax.tree.leaves(packed))
  for name, tree in (("nnx_state", as_nnx), ("plain_dict", pure), ("packed", packed)):
    out[f"{name}_flatten_ms"] = _flatten_ms(tree)
    out[f"{name}_dispatch_ms"] = _dispatch_ms(jax.tree.map(jnp.copy, tree))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="convnext_tiny")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  r = measure(a.model)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(r, f, indent=2)
  print(f"{r['model']} TrainState ({r['leaves']} arrays) on {r['device']}: flatten+unflatten "
        f"{r['nnx_state_flatten_ms']:.2f} ms as nnx.State vs {r['plain_dict_flatten_ms']:.2f} "
        f"ms as plain dicts; identity-step dispatch {r['nnx_state_dispatch_ms']:.2f} vs "
        f"{r['plain_dict_dispatch_ms']:.2f} ms; packed ({r['packed_arrays']} arrays): "
        f"flatten {r['packed_flatten_ms']:.2f} ms, dispatch {r['packed_dispatch_ms']:.2f} ms")
  return r


if __name__ == "__main__":
  main()
