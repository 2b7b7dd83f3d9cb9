"""XLA formulations of the ConvNeXt block, fwd and fwd+bwd times (N=128, bf16, 4 stage shapes).

An experiment kept for reproducibility of the notes: plain reference, jax.checkpoint of it,
the depthwise conv as 49 shifted multiply-adds (slow to compile), and a tanh-GELU variant
(a different function from timm's exact GELU, for information only).

    PYTHONPATH=. python3 -m benchmarks.xla_convnext_variants
"""
import time, jax, jax.numpy as jnp, numpy as np
from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams, convnext_block_reference as ref

def shifted_dwconv_ref(x, p, scale=None, eps=1e-6, approx=False):
  dtype = x.dtype; n, h, w, c = x.shape; k = p.dw_kernel.shape[0]; pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  wk = p.dw_kernel.astype(dtype)
  z = sum(xp[:, i:i + h, j:j + w, :].astype(jnp.float32) * wk[i, j].astype(jnp.float32) for i in range(k) for j in range(k))
  z = (z + p.dw_bias).astype(dtype).astype(jnp.float32)
  mean = z.mean(-1, keepdims=True); var = jnp.square(z - mean).mean(-1, keepdims=True)
  zn = (z - mean) * jax.lax.rsqrt(var + eps) * p.ln_scale + p.ln_bias
  hh = jax.nn.gelu(zn.astype(dtype) @ p.fc1_kernel.astype(dtype) + p.fc1_bias.astype(dtype), approximate=approx)
  out = (hh @ p.fc2_kernel.astype(dtype) + p.fc2_bias.astype(dtype)) * p.gamma.astype(dtype)
  return x + out

def tanh_ref(x, p):
  dtype = x.dtype; c = x.shape[-1]
  z = jax.lax.conv_general_dilated(x, p.dw_kernel.reshape(7, 7, 1, c).astype(dtype), (1, 1), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  z = (z + p.dw_bias.astype(dtype)).astype(jnp.float32)
  mean = z.mean(-1, keepdims=True); var = jnp.square(z - mean).mean(-1, keepdims=True)
  zn = (z - mean) * jax.lax.rsqrt(var + 1e-6) * p.ln_scale + p.ln_bias
  hh = jax.nn.gelu(zn.astype(dtype) @ p.fc1_kernel.astype(dtype) + p.fc1_bias.astype(dtype), approximate=True)
  return x + (hh @ p.fc2_kernel.astype(dtype) + p.fc2_bias.astype(dtype)) * p.gamma.astype(dtype)

def bench(f, *a, n=20):
  f = jax.jit(f)
  for _ in range(3): jax.block_until_ready(f(*a))
  ts = []
  for _ in range(n):
    t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
  return np.median(ts) * 1e3

def fb(fn):
  return lambda x, p, g: jax.vjp(fn, x, p)[1](g)

variants = {
  "plain": ref,
  "remat": jax.checkpoint(ref),
  "shifted": shifted_dwconv_ref,
  "shifted+remat": jax.checkpoint(shifted_dwconv_ref),
  "tanh(info)": tanh_ref,
}
for hw, c in [(56, 96), (28, 192), (14, 384), (7, 768)]:
  ks = jax.random.split(jax.random.key(0), 11)
  shapes = [(7, 7, c), (c,), (c,), (c,), (c, 4 * c), (4 * c,), (4 * c, c), (c,), (c,)]
  p = ConvNeXtBlockParams(*[jax.random.normal(k, s) * 0.1 for k, s in zip(ks, shapes)])
  x = jax.random.normal(ks[9], (128, hw, hw, c), jnp.bfloat16)
  g = jax.random.normal(ks[10], x.shape, jnp.bfloat16)
  row = []
  y0 = ref(x, p).astype(jnp.float32)
  for name, f in variants.items():
    err = float(jnp.abs(f(x, p).astype(jnp.float32) - y0).max() / jnp.abs(y0).max())
    row.append(f"{name}: fwd {bench(f, x, p):.3f} f+b {bench(fb(f), x, p, g):.3f} (err {err:.1e})")
  print(f"{hw}x{hw}x{c} | " + " | ".join(row), flush=True)
