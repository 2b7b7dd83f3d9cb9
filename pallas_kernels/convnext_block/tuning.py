"""Tile sizes for the fused ConvNeXt block kernels: a small table keyed by
(C, dtype, device kind), a heuristic for anything not in it, and ``retune`` to time
candidates on the user's GPU and cache the winners in a JSON file.

Why tiles shrink as C grows: the forward kernel holds a (pixels x C) float32 accumulator
plus the normalised (pixels x C) input in registers for the whole hidden-dimension loop.
The register file of an SM is 256 KiB; at C=768 a 64-pixel tile would need 192 KiB for
the accumulator alone and spill, so large C takes 16-32 pixel tiles and smaller hidden
chunks, small C takes 128-256 pixel tiles (fewer programs re-reading the weights from
L2, and tensor-core dots with M >= 64)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ConvNeXtTiles:
  # forward kernel: pixels per program, hidden chunk, warps, pipelining stages
  fwd_pixels: int = 64
  fwd_hidden: int = 64
  fwd_warps: int = 4
  fwd_stages: int = 1
  # backward kernel A (recompute + MLP/LN backward -> dz)
  bwd_pixels: int = 32
  bwd_hidden: int = 32
  bwd_warps: int = 4
  # weight-gradient kernel W (fc1/fc2 grads): rows per step, hidden chunk, programs
  wgrad_rows: int = 64
  wgrad_hidden: int = 32
  wgrad_warps: int = 4
  wgrad_programs: int = 264  # ~2 per SM on H100
  # depthwise-conv backward kernel B: pixels x channels per program
  dw_pixels: int = 256
  dw_channels: int = 32
  dw_warps: int = 4
  # largest power-of-two channel block used in the matmul kernels
  channel_block: int = 128

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def heuristic_tiles(c: int, dtype) -> ConvNeXtTiles:
  """Defaults by channel count (register budget: see module docstring)."""
  if c <= 128:
    return ConvNeXtTiles(fwd_pixels=128, fwd_hidden=64, bwd_pixels=64, bwd_hidden=64,
                         wgrad_rows=128, wgrad_hidden=64, dw_channels=32)
  if c <= 256:
    return ConvNeXtTiles(fwd_pixels=64, fwd_hidden=64, bwd_pixels=64, bwd_hidden=32,
                         wgrad_rows=64, wgrad_hidden=32, dw_channels=64)
  if c <= 512:
    return ConvNeXtTiles(fwd_pixels=32, fwd_hidden=64, fwd_warps=4, bwd_pixels=32,
                         bwd_hidden=32, wgrad_rows=64, wgrad_hidden=32, dw_channels=64)
  return ConvNeXtTiles(fwd_pixels=16, fwd_hidden=32, fwd_warps=8, bwd_pixels=16,
                       bwd_hidden=32, bwd_warps=8, wgrad_rows=64, wgrad_hidden=16,
                       wgrad_warps=8, dw_channels=64)


# (C, dtype name, device kind) -> tiles measured on that device.  Filled from ``retune``.
TUNED: dict[tuple[int, str, str], ConvNeXtTiles] = {}

_CACHE_ENV = "CONVFIRST_JAX_TUNING_CACHE"


def _cache_path() -> str:
  return os.environ.get(_CACHE_ENV, os.path.expanduser("~/.cache/convfirst_jax/convnext_block.json"))


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind
  except Exception:  # pragma: no cover
    return "unknown"


def _load_cache() -> dict:
  try:
    with open(_cache_path()) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _key(c: int, dtype, kind: str) -> str:
  return f"{c}|{jnp.dtype(dtype).name}|{kind}"


def get_tiles(c: int, dtype, device_kind: str | None = None) -> ConvNeXtTiles:
  kind = device_kind or _device_kind()
  name = jnp.dtype(dtype).name
  cached = _load_cache().get(_key(c, dtype, kind))
  if cached:
    return ConvNeXtTiles(**cached)
  if (c, name, kind) in TUNED:
    return TUNED[(c, name, kind)]
  return heuristic_tiles(c, dtype)


def _time(fn: Callable, args, iters: int = 20) -> float:
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  ts.sort()
  return ts[len(ts) // 2]


def retune(x_shape, dtype=jnp.bfloat16, candidates: list[ConvNeXtTiles] | None = None,
           *, backward: bool = True, save: bool = True, iters: int = 20, verbose: bool = True):
  """Times each candidate tile set on random data of ``x_shape`` (NHWC) on the current
  device (forward, plus forward+backward when ``backward``), stores the fastest in the
  JSON cache (path: $CONVFIRST_JAX_TUNING_CACHE or ~/.cache/convfirst_jax/) and returns
  (best tiles, [(tiles, seconds), ...]).  Candidates that fail to compile are skipped."""
  from pallas_kernels.convnext_block import api, reference

  c = x_shape[-1]
  if candidates is None:
    base = heuristic_tiles(c, dtype)
    candidates = [base]
    for fp in (16, 32, 64, 128, 256):
      for fh in (32, 64, 128):
        for fw in (4, 8):
          candidates.append(dataclasses.replace(base, fwd_pixels=fp, fwd_hidden=fh, fwd_warps=fw))
  key = jax.random.key(0)
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
  params = reference_params(kp, c)
  results = []
  for tiles in candidates:
    def f(x, p):
      return api.convnext_block(x, p, implementation="pallas", tiles=tiles)
    if backward:
      g = jax.jit(jax.grad(lambda x, p: jnp.sum(f(x, p).astype(jnp.float32)), argnums=(0, 1)))
      fn = jax.jit(lambda x, p: (f(x, p), g(x, p)))
    else:
      fn = jax.jit(f)
    try:
      t = _time(fn, (x, params), iters)
    except Exception as e:  # a candidate that does not compile (registers, shared memory)
      if verbose:
        print(f"skip {tiles}: {type(e).__name__}: {str(e)[:100]}")
      continue
    results.append((tiles, t))
    if verbose:
      print(f"{t * 1e3:8.3f} ms  {tiles}")
  best = min(results, key=lambda r: r[1])[0]
  if save:
    data = _load_cache()
    data[_key(c, dtype, _device_kind())] = best.to_json()
    os.makedirs(os.path.dirname(_cache_path()), exist_ok=True)
    with open(_cache_path(), "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
  del reference
  return best, results


def reference_params(key, c: int, hidden_ratio: int = 4, k: int = 7):
  """Random block parameters (gamma O(1) so the branch is visible in comparisons)."""
  from pallas_kernels.convnext_block.reference import ConvNeXtBlockParams
  ks = jax.random.split(key, 9)
  hdim = hidden_ratio * c
  n = jax.random.normal
  return ConvNeXtBlockParams(
      dw_kernel=n(ks[0], (k, k, c)) * 0.1, dw_bias=n(ks[1], (c,)) * 0.1,
      ln_scale=1.0 + 0.1 * n(ks[2], (c,)), ln_bias=0.1 * n(ks[3], (c,)),
      fc1_kernel=n(ks[4], (c, hdim)) / jnp.sqrt(c), fc1_bias=0.1 * n(ks[5], (hdim,)),
      fc2_kernel=n(ks[6], (hdim, c)) / jnp.sqrt(hdim), fc2_bias=0.1 * n(ks[7], (c,)),
      gamma=1.0 + 0.1 * n(ks[8], (c,)))
