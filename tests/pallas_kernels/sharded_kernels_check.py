"""Every batch-wise Pallas entry point traced under ``jax.set_mesh`` with the batch split
over two devices, against the same call traced without a mesh (one device, the whole
batch): outputs and gradients, and whether the traced program holds a ``shard_map``.

    python -m tests.pallas_kernels.sharded_kernels_check          # 2 forced CPU devices
    python -m tests.pallas_kernels.sharded_kernels_check --gpu    # 2 GPUs, compiled

On CPU (test_batch_sharding.py) the kernels run in the interpreters -- except the Mosaic
GPU ones, whose interpreter (jax 0.11.2) fails its own end-of-kernel barrier check when two
devices run a kernel at once (``Barrier remains allocated`` on one device while the other
still holds its barriers): those cases are only traced there ("ran": false); ``--gpu``
runs every case.  Prints ``RESULT {json}``: per case the largest norm-relative difference
and the shard_map flags."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from pallas_kernels import layernorm
from pallas_kernels.convfirst_block import train as cf_train
from pallas_kernels.convnext_block import tuning

F32, BF16 = jnp.float32, jnp.bfloat16
SMALL_TILES = tuning.ConvNeXtTiles(
    fwd_pixels=16, fwd_hidden=32, bwd_pixels=16, bwd_hidden=16, wgrad_rows=16,
    wgrad_hidden=32, wgrad_programs=12, dw_pixels=16, dw_channels=16)


def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, F32)


def _cases(gpu: bool):
  """name -> (fn(x, params), x, params, differentiate, runs in the CPU interpreter)."""
  interp = not gpu
  tiles = None if gpu else SMALL_TILES
  ks = iter(jax.random.split(jax.random.key(0), 64))
  cases = {}

  x = _normal(next(ks), (4, 3, 5, 32))
  s, b = 1 + _normal(next(ks), (32,), 0.2), _normal(next(ks), (32,), 0.2)
  cases["layer_norm"] = (lambda x, p: layernorm.layer_norm(
      x, *p, implementation="pallas", interpret=interp), x, (s, b), True, True)

  x = _normal(next(ks), (2, 9, 13, 32))
  p = tuning.reference_params(next(ks), 32)
  d = jax.random.uniform(next(ks), (2,)) + 0.5
  cases["convnext_block"] = (lambda x, p, d=d: pallas_kernels.convnext_block(
      x, p, d, implementation="pallas", interpret=interp, tiles=tiles), x, p, True, True)

  x = _normal(next(ks), (2, 5, 7, 32))
  w = _normal(next(ks), (3, 3, 8, 32), 1 / 72 ** 0.5)
  cases["grouped_conv"] = (lambda x, w: pallas_kernels.grouped_conv(
      x, w, implementation="pallas", interpret=interp), x, w, True, True)

  c, e = 32, 128
  p = pallas_kernels.ConvFirstBlockParams(
      _normal(next(ks), (3, 3, 8, c), 1 / 72 ** 0.5), _normal(next(ks), (c,), 0.1),
      _normal(next(ks), (c, e), c ** -0.5), _normal(next(ks), (e,), 0.1),
      _normal(next(ks), (e, c), e ** -0.5), _normal(next(ks), (c,), 0.1))
  x = _normal(next(ks), (2, 5, 7, c))
  cases["convfirst_block"] = (lambda x, p: pallas_kernels.convfirst_block(
      x, p, implementation="pallas", interpret=interp), x, p, False, True)

  blocks = [pallas_kernels.ConvFirstBlockParams(
      _normal(next(ks), (3, 3, 8, c), 1 / 72 ** 0.5), _normal(next(ks), (c,), 0.1),
      _normal(next(ks), (c, e), c ** -0.5), _normal(next(ks), (e,), 0.1),
      _normal(next(ks), (e, c), e ** -0.5), _normal(next(ks), (c,), 0.1)) for _ in range(2)]
  x = _normal(next(ks), (2, 5, 7, c)).astype(BF16)
  cases["convfirst_stage"] = (lambda x, ps: pallas_kernels.convfirst_stage(
      x, ps, implementation="pallas", interpret=interp), x, blocks, False, False)

  c, e = 64, 256
  blocks = [pallas_kernels.MBConvBlockParams(
      _normal(next(ks), (c, e), c ** -0.5), _normal(next(ks), (e,), 0.1),
      _normal(next(ks), (3, 3, 8, e), 1 / 72 ** 0.5), _normal(next(ks), (e,), 0.1),
      _normal(next(ks), (e, c), e ** -0.5), _normal(next(ks), (c,), 0.1)) for _ in range(2)]
  x = _normal(next(ks), (2, 5, 7, c)).astype(BF16)
  cases["mbconv_stage"] = (lambda x, ps: pallas_kernels.mbconv_stage(
      x, ps, implementation="pallas", interpret=interp), x, blocks, False, False)

  c, e = 32, 128
  n = jax.random.normal
  tk = jax.random.split(next(ks), 9)
  tp = pallas_kernels.ConvFirstTrainParams(
      conv_kernel=n(tk[0], (3, 3, 8, c)) / 72 ** 0.5, bn_conv_scale=1 + 0.2 * n(tk[1], (c,)),
      bn_conv_bias=0.2 * n(tk[2], (c,)), fc1_kernel=n(tk[3], (c, e)) / c ** 0.5,
      bn1_scale=1 + 0.2 * n(tk[4], (e,)), bn1_bias=0.2 * n(tk[5], (e,)),
      fc2_kernel=n(tk[6], (e, c)) / e ** 0.5, bn2_scale=1 + 0.2 * n(tk[7], (c,)),
      bn2_bias=0.2 * n(tk[8], (c,)))
  x = _normal(next(ks), (4, 5, 7, c)).astype(BF16)
  d = jax.random.uniform(next(ks), (4,)) + 0.5
  cases["convfirst_block_train"] = (lambda x, p, d=d: cf_train.convfirst_block_train(
      x, p, d, implementation="pallas", interpret=interp)[0], x, tp, True, False)

  # BatchNorm with batch statistics: each device's kernel sums its own rows, the partial
  # sums of both devices are added (global statistics, as on one device).
  x = _normal(next(ks), (4, 3, 5, 32)) + 0.5
  s, b = 1 + _normal(next(ks), (32,), 0.2), _normal(next(ks), (32,), 0.2)
  cases["batch_norm_act"] = (lambda x, p: pallas_kernels.batch_norm_act(
      x.reshape(-1, 32), *p, act="silu", batch=x.shape[0], implementation="pallas",
      interpret=interp)[0].reshape(x.shape), x, (s, b), True, True)

  c, e = 32, 128
  tk = jax.random.split(next(ks), 9)
  mp = pallas_kernels.MBConvTrainParams(
      fc1_kernel=n(tk[0], (c, e)) / c ** 0.5, bn1_scale=1 + 0.2 * n(tk[1], (e,)),
      bn1_bias=0.2 * n(tk[2], (e,)), conv_kernel=n(tk[3], (3, 3, 8, e)) / 72 ** 0.5,
      bn_conv_scale=1 + 0.2 * n(tk[4], (e,)), bn_conv_bias=0.2 * n(tk[5], (e,)),
      fc2_kernel=n(tk[6], (e, c)) / e ** 0.5, bn2_scale=1 + 0.2 * n(tk[7], (c,)),
      bn2_bias=0.2 * n(tk[8], (c,)))
  x = _normal(next(ks), (4, 5, 3, c))
  d = jax.random.uniform(next(ks), (4,)) + 0.5
  cases["mbconv_block_train"] = (lambda x, p, d=d: pallas_kernels.mbconv_block_train(
      x, p, d, implementation="pallas", interpret=interp)[0], x, mp, True, True)
  return cases


def _rel(a, b):
  a = np.asarray(jnp.asarray(a, F32), np.float64)
  b = np.asarray(jnp.asarray(b, F32), np.float64)
  assert not np.isnan(a).any()
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None):
  gpu = "--gpu" in (sys.argv[1:] if argv is None else argv)
  # As tests/conftest.py: the Mosaic GPU interpreter's multi-warpgroup kernels and
  # asynchronous CPU dispatch can deadlock.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  jax.config.update("jax_default_matmul_precision", "highest")
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
  assert mesh.size == 2, jax.devices()
  report = {}
  for name, (fn, x, params, grads, on_cpu) in _cases(gpu).items():
    g = jax.random.normal(jax.random.key(7), x.shape, F32)

    def run(x, params):
      if not grads:
        return [fn(x, params)]
      y, vjp = jax.vjp(fn, x, params)
      return [y, *jax.tree.leaves(vjp(g.astype(y.dtype)))]

    ran = gpu or on_cpu
    plain_jaxpr = str(jax.make_jaxpr(run)(x, params))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ps = jax.device_put(params, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
      mesh_jaxpr = str(jax.make_jaxpr(run)(xs, ps))
      with pallas_kernels.batch_sharding(False):  # a new function: not the cached trace
        off_jaxpr = str(jax.make_jaxpr(lambda x, p: run(x, p))(xs, ps))
    report[name] = {
        "ran": ran, "dtype": str(x.dtype),
        "shard_map_with_mesh": "shard_map" in mesh_jaxpr,
        "shard_map_without_mesh": "shard_map" in plain_jaxpr,
        "shard_map_when_off": "shard_map" in off_jaxpr}
    if ran:
      want = jax.jit(run)(x, params)
      with jax.set_mesh(mesh):
        got = jax.jit(run)(xs, ps)
      errs = [_rel(a, b) for a, b in zip(got, want)]
      if name == "convfirst_block_train":
        # BN_g's bias (output 4: y, x, conv_kernel, bn_conv_scale, bn_conv_bias) has a zero
        # gradient in exact arithmetic (BN_1 removes any per-channel shift of its input's
        # product): its bfloat16 value is rounding noise, compared to the scale of the
        # other parameters' gradients instead of its own.
        scale = max(float(np.linalg.norm(np.asarray(w, np.float64))) for w in want[2:])
        errs[4] = float(np.linalg.norm(np.asarray(got[4], np.float64)
                                       - np.asarray(want[4], np.float64)) / scale)
      report[name].update(max_rel=max(errs), errs=[float(f"{e:.3g}") for e in errs],
                          outputs=len(got), out_sharding=str(got[0].sharding.spec))
    print(name, report[name], flush=True)
  report["predictor"] = _predictor_case(mesh, gpu)
  print("predictor", report["predictor"], flush=True)
  print("RESULT " + json.dumps(report))


def _predictor_case(mesh, gpu: bool):
  """``convfirst_jax.predictor(model, mesh)`` against ``predictor(model)``: a tiny ConvNeXt
  (XLA blocks on CPU; on GPUs bf16 with block_impl="pallas"), and its error for a batch
  the mesh does not divide."""
  import convfirst_jax as cj
  from flax import nnx
  kw = dict(block_impl="pallas", dtype=BF16) if gpu else {}
  # Initialised in one jitted call: eagerly every initialiser of another shape is a program
  # of its own to compile (3.7 -> 2.0 s on a 2-core CPU).
  model = nnx.jit(lambda: cj.create_model("convnext_atto", num_classes=10, rngs=0,
                                          depths=[1, 1, 1, 1], dims=[32, 64, 128, 256],
                                          **kw))()
  model.eval()
  x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
  want = cj.predictor(model)(x)
  got = cj.predictor(model, mesh)(x)
  try:
    cj.predictor(model, mesh)(x[:3])
    error = None
  except ValueError as e:
    error = str(e)
  return {"ran": True, "dtype": "bfloat16" if gpu else "float32", "max_rel": _rel(got, want),
          "out_sharding": str(got.sharding.spec), "odd_batch_error": error}


if __name__ == "__main__":
  main()
