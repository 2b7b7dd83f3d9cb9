"""The measured side of the waterline: time every block group of a model, and the whole
model's forward pass, on jax's default device.

Each group (stem, downsample, residual block, head) runs alone under ``jax.jit`` on random
inputs of its input shape, after warm-up, synchronised with ``block_until_ready``; the
reported time is the median of ``iters`` runs.  Identical groups (same module type, input
shape and parameter shapes) are timed once and the time is reported for each of them.
Residual blocks are timed with ``implementation="xla"`` and ``"pallas"``; a Pallas kernel
that raises ``NotImplementedError`` (not written yet, or a shape it does not cover) is
reported as n/a.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.timing import median_seconds

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass
class Group:
  """A block group of a model: the module that runs it and how to call it."""
  name: str
  module: nnx.Module | None
  apply: Callable          # apply(module, x) -> y
  residual: bool           # residual blocks take ``implementation``


def _sequential(module, x):
  for layer in module:
    x = layer(x)
  return x


def _call(module, x):
  return module(x)


def _head(module, x):
  if module is None:
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  return module(x)


def model_groups(model) -> list[Group]:
  """The block groups of a ConvNeXt or ConvFirstNet, named and ordered like
  ``block_counts(layer_counts(model))``."""
  stem_apply = _sequential if isinstance(model.stem, nnx.List) else _call
  groups = [Group("stem", model.stem, stem_apply, False)]
  for i, stage in enumerate(model.stages):
    if stage.downsample is not None:
      apply = _sequential if isinstance(stage.downsample, nnx.List) else _call
      groups.append(Group(f"stages.{i}.downsample", stage.downsample, apply, False))
    for j, block in enumerate(stage.blocks):
      groups.append(Group(f"stages.{i}.blocks.{j}", block, _call, True))
  groups.append(Group("head", model.head, _head, False))
  return groups


def median_time(fn: Callable, *args, warmup: int = 5, iters: int = 30) -> float:
  """Median wall time of ``fn(*args)`` in seconds, each run synchronised.  The first call
  (compilation) is not timed."""
  return median_seconds(fn, *args, warmup=warmup + 1, iters=iters)


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:300] if lines else ""


def _jitted(module, apply):
  if module is None:
    return jax.jit(lambda state, x: apply(None, x)), None
  graphdef, state = nnx.split(module)
  return jax.jit(lambda state, x: apply(nnx.merge(graphdef, state), x)), state


def _key(group: Group, in_shape, impl):
  if group.module is None:
    return ("none", tuple(in_shape), impl)
  shapes = tuple((str(p), tuple(v.shape), str(v.dtype))
                 for p, v in nnx.to_flat_state(nnx.state(group.module)))
  return (type(group.module).__name__, tuple(in_shape), shapes, impl,
          getattr(group.module, "dtype", None))


@dataclasses.dataclass
class Timing:
  seconds: float | None     # None: not available
  note: str = ""            # why not (or "" when measured)


def _time_group(group: Group, in_shape, dtype, impl, warmup, iters, seed) -> Timing:
  x = jax.random.normal(jax.random.key(seed), in_shape, jnp.float32).astype(dtype)
  module = group.module
  old = None
  if group.residual:
    old = module.implementation
    module.implementation = impl
  try:
    fn, state = _jitted(module, group.apply)
    return Timing(median_time(fn, state, x, warmup=warmup, iters=iters))
  except NotImplementedError as e:
    return Timing(None, f"not implemented: {e}")
  except Exception as e:  # a kernel that fails to lower must not stop the whole run
    if impl == "xla":
      raise
    warnings.warn(f"{group.name} ({impl}) failed: {type(e).__name__}: {_first_line(e)}")
    return Timing(None, f"{type(e).__name__}: {_first_line(e)}")
  finally:
    if old is not None:
      module.implementation = old


def measure_blocks(model, in_shapes: dict, dtype, *, impls=IMPLEMENTATIONS, warmup: int = 5,
                   iters: int = 30, progress: bool = True) -> dict[str, dict[str, Timing]]:
  """Times every block group of ``model`` alone.

  Args:
    model: a concrete ConvNeXt or ConvFirstNet (eval mode).
    in_shapes: group name -> input shape (``BlockCount.in_shape``).
    dtype: input dtype (the model's compute dtype).
    impls: implementations to time residual blocks with; other groups are XLA only.
  Returns:
    group name -> {impl: Timing}; identical groups share one measurement.
  """
  groups = model_groups(model)
  jobs = []                              # (group, impl, key)
  for g in groups:
    for impl in (impls if g.residual else ("xla",)):
      jobs.append((g, impl, _key(g, in_shapes[g.name], impl)))
  unique = {}
  for g, impl, key in jobs:
    unique.setdefault(key, (g, impl))
  it = unique.items()
  if progress:
    from tqdm import tqdm
    it = tqdm(list(it), desc="timing blocks", unit="kernel")
  done = {}
  for seed, (key, (g, impl)) in enumerate(it):
    done[key] = _time_group(g, in_shapes[g.name], dtype, impl, warmup, iters, seed)
  out: dict[str, dict[str, Timing]] = {}
  for g, impl, key in jobs:
    out.setdefault(g.name, {})[impl] = done[key]
  return out


def measure_model(model, input_shape, dtype, *, impls=IMPLEMENTATIONS, warmup: int = 3,
                  iters: int = 20) -> dict[str, Timing]:
  """Times the whole model's forward pass, every residual block set to each impl."""
  blocks = [g.module for g in model_groups(model) if g.residual]
  x = jax.random.normal(jax.random.key(0), input_shape, jnp.float32).astype(dtype)
  out = {}
  for impl in impls:
    old = [b.implementation for b in blocks]
    for b in blocks:
      b.implementation = impl
    try:
      fn, state = _jitted(model, _call)
      out[impl] = Timing(median_time(fn, state, x, warmup=warmup, iters=iters))
    except NotImplementedError as e:
      out[impl] = Timing(None, f"not implemented: {e}")
    except Exception as e:
      if impl == "xla":
        raise
      warnings.warn(f"whole model ({impl}) failed: {type(e).__name__}: {_first_line(e)}")
      out[impl] = Timing(None, f"{type(e).__name__}: {_first_line(e)}")
    finally:
      for b, o in zip(blocks, old):
        b.implementation = o
  return out
