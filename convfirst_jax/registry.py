"""Model registry: ``create_model(name, ...)`` and ``list_models()``, as in timm."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from convfirst_jax.convfirst import ConvFirstNet
from convfirst_jax.convnext import ConvNeXt

_MODELS: dict[str, Callable[..., nnx.Module]] = {}
_DEFAULTS: dict[str, dict] = {}


def register_model(name: str, cls, **arch):
  """Registers ``name`` as ``cls(**arch, **user_kwargs)``."""
  if name in _MODELS:
    raise ValueError(f"model {name!r} is already registered")
  _DEFAULTS[name] = dict(arch)
  _MODELS[name] = lambda **kw: cls(**{**arch, **kw})


def list_models(pattern: str = "*") -> list[str]:
  """Registered model names matching a glob pattern (e.g. ``"convnext_*"``), sorted."""
  return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_config(name: str) -> dict:
  """The architecture arguments a registered name stands for."""
  _check_name(name)
  return dict(_DEFAULTS[name])


def _check_name(name: str):
  if name not in _MODELS:
    close = [n for n in _MODELS if name.split("_")[0] in n]
    hint = f"; similar: {', '.join(sorted(close))}" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}. Available: {', '.join(list_models())}")


def create_model(name: str, *, num_classes: int = 1000, block_impl: str | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | int = 0,
                 **kwargs) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: one of ``list_models()``.
    num_classes: classifier outputs.
    block_impl: "xla" | "pallas" | None (fastest supported) for every residual block.
    dtype: compute dtype (``jnp.bfloat16`` on GPU); parameters stay ``param_dtype``.
    rngs: an ``nnx.Rngs`` or an int seed (streams ``params`` and ``dropout``).
    **kwargs: any other constructor argument (``drop_path_rate=0.1``, ``in_chans=1`` ...).
  """
  _check_name(name)
  if isinstance(rngs, int):
    rngs = nnx.Rngs(params=rngs, dropout=rngs + 1)
  return _MODELS[name](num_classes=num_classes, block_impl=block_impl, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs, **kwargs)


# ConvNeXt, timm's variants (names and shapes as timm 1.0).
for _name, _depths, _dims in [
    ("atto", (2, 2, 6, 2), (40, 80, 160, 320)),
    ("femto", (2, 2, 6, 2), (48, 96, 192, 384)),
    ("pico", (2, 2, 6, 2), (64, 128, 256, 512)),
    ("nano", (2, 2, 8, 2), (80, 160, 320, 640)),
    ("tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
    ("small", (3, 3, 27, 3), (96, 192, 384, 768)),
    ("base", (3, 3, 27, 3), (128, 256, 512, 1024)),
    ("large", (3, 3, 27, 3), (192, 384, 768, 1536)),
]:
  register_model(f"convnext_{_name}", ConvNeXt, depths=_depths, dims=_dims)

# ConvFirstNet (see convfirst_jax/convfirst.py for the rationale of the numbers).
for _name, _depths, _dims in [
    ("atto", (2, 2, 4, 2), (32, 64, 128, 256)),
    ("nano", (2, 2, 6, 2), (64, 128, 256, 512)),
    ("t", (3, 3, 9, 3), (96, 192, 384, 768)),
    ("s", (3, 3, 27, 3), (96, 192, 384, 768)),
]:
  register_model(f"convfirst_{_name}", ConvFirstNet, depths=_depths, dims=_dims,
                 block_types=("convfirst", "convfirst", "mbconv", "mbconv"),
                 kernel_size=3, expansions=4)
