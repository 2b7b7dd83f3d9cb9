"""On-device correctness check of the compiled kernels (the CPU tests use the
interpreter): forward and every gradient vs the reference, several channel counts, both
dtypes.  PYTHONPATH=. python3 -m pallas_kernels.convnext_block.gpu_check"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.convnext_block import api, tuning

jax.config.update("jax_default_matmul_precision", "highest")


def rel(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def main(channels=(40, 96, 192, 384, 768), shapes=((2, 9, 13), (1, 5, 7))):
  worst = {}
  for c in channels:
    for (n, h, w) in shapes:
      for dtype in (jnp.float32, jnp.bfloat16):
        t0 = time.time()
        kx, kp, kg, kd = jax.random.split(jax.random.key(c * 1000 + h), 4)
        x = jax.random.normal(kx, (n, h, w, c)).astype(dtype)
        p = tuning.reference_params(kp, c)
        g = jax.random.normal(kg, x.shape).astype(dtype)
        dps = jax.random.uniform(kd, (n,)) + 0.5
        outs = {}
        for impl in ("pallas", "xla"):
          f = lambda x, p, d: api.convnext_block(x, p, d, implementation=impl)
          xin = x.astype(jnp.float32) if impl == "xla" else x
          y, vjp = jax.vjp(f, xin, p, dps)
          outs[impl] = [y] + jax.tree.leaves(vjp(g.astype(y.dtype)))
        errs = [rel(a, b) for a, b in zip(outs["pallas"], outs["xla"])]
        key = jnp.dtype(dtype).name
        worst[key] = max(worst.get(key, 0), max(errs))
        nan = any(bool(jnp.any(jnp.isnan(jnp.asarray(a, jnp.float32)))) for a in outs["pallas"])
        print(f"C={c} {n}x{h}x{w} {key}: max rel err {max(errs):.2e} "
              f"(y {errs[0]:.1e}, dx {errs[1]:.1e}) nan={nan} {time.time() - t0:.1f}s", flush=True)
  print("WORST", worst)
  return 0


if __name__ == "__main__":
  sys.exit(main())
