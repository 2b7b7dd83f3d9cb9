"""Channel LayerNorm, Pallas kernels vs XLA (``nnx.LayerNorm``), forward and forward +
backward, at ConvNeXt's stem / downsampling shapes; checks the Pallas results in the same run.

    PYTHONPATH=. python3 -m benchmarks.layernorm [--batch 256] [--json out.json]

H100 80GB HBM3, 2026-11-26, batch 256, bf16 (raw ``results/layernorm_h100_2026-11-26_session3.json``),
forward / forward + backward, ms: 56x56x96 Pallas 0.121 / 0.268 vs XLA 0.236 / 0.572;
28x28x192 0.067 / 0.143 vs 0.108 / 0.275; 14x14x384 0.040 / 0.096 vs 0.059 / 0.139.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import layernorm as ln
from pallas_kernels.timing import median_ms

SHAPES = ((56, 96), (28, 192), (14, 384))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    raise SystemExit("benchmarks.layernorm needs a GPU backend")
  rows = []
  for hw, c in SHAPES:
    shape = (a.batch, hw, hw, c)
    k = jax.random.split(jax.random.key(c), 5)
    xs = [(jax.random.normal(kk, shape) * 2 + 1).astype(jnp.bfloat16) for kk in k[:2]]
    # dy is an argument of the timed function (not a constant baked into the executable),
    # drawn from its own key (not the first input's)
    dy = jax.random.normal(k[2], shape).astype(jnp.bfloat16)
    scale = 1 + 0.1 * jax.random.normal(k[3], (c,))
    bias = 0.1 * jax.random.normal(k[4], (c,))
    impls = {"xla": functools.partial(_xla, c),
             "pallas": lambda x, s, b: ln.layer_norm(x, s, b, eps=1e-6,
                                                      implementation="pallas")}
    res = {}
    for name, f in impls.items():
      fwd = jax.jit(f)
      fb = jax.jit(lambda x, s, b, g, f=f: jax.vjp(f, x, s, b)[1](g))
      res[name] = dict(fwd_ms=median_ms(fwd, [(x, scale, bias) for x in xs]),
                       fwd_bwd_ms=median_ms(fb, [(x, scale, bias, dy) for x in xs]),
                       out=fwd(xs[0], scale, bias), grads=fb(xs[0], scale, bias, dy))
    ref = ln.layer_norm_reference(xs[0].astype(jnp.float32), scale, bias)
    rel = lambda u, v: float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32)))
                             / jnp.max(jnp.abs(v.astype(jnp.float32))))
    err_y = rel(res["pallas"]["out"], ref)
    err_g = max(rel(gp, gx) for gp, gx in zip(res["pallas"]["grads"], res["xla"]["grads"]))
    mb = 2 * np.prod(shape) * 2 / 1e6
    rows.append(dict(shape=list(shape), xla_fwd_ms=res["xla"]["fwd_ms"],
                     pallas_fwd_ms=res["pallas"]["fwd_ms"],
                     xla_fwd_bwd_ms=res["xla"]["fwd_bwd_ms"],
                     pallas_fwd_bwd_ms=res["pallas"]["fwd_bwd_ms"],
                     err_y_vs_f32=err_y, err_grads_vs_xla=err_g, fwd_mbytes=float(mb)))
  device = jax.devices()[0].device_kind
  print(f"Channel LayerNorm, bf16, {device}, {datetime.date.today().isoformat()} (ms; "
        f"err: max relative, y vs float32 reference, gradients vs XLA's)")
  print(f"{'shape':>18} {'XLA fwd':>8} {'Pallas':>8} {'XLA f+b':>8} {'Pallas':>8} "
        f"{'err y':>8} {'err grads':>9}")
  for r in rows:
    print(f"{'x'.join(map(str, r['shape'])):>18} {r['xla_fwd_ms']:8.3f} {r['pallas_fwd_ms']:8.3f} "
          f"{r['xla_fwd_bwd_ms']:8.3f} {r['pallas_fwd_bwd_ms']:8.3f} {r['err_y_vs_f32']:8.1e} "
          f"{r['err_grads_vs_xla']:9.1e}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(device=device, date=datetime.date.today().isoformat(), rows=rows), f,
                indent=1)
  return 0


def _xla(c, x, scale, bias):
  """nnx.LayerNorm's own computation (bf16 out, float32 statistics) with these parameters."""
  mod = nnx.LayerNorm(c, epsilon=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  mod.scale[...], mod.bias[...] = scale, bias
  return mod(x)


if __name__ == "__main__":
  raise SystemExit(main())
