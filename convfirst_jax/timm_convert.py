"""Conversion between timm ConvNeXt state dicts and our ConvNeXt parameters.

A state dict here is a mapping from timm's names (``stages.1.blocks.0.mlp.fc1.weight``) to
numpy arrays (``{k: v.numpy() for k, v in timm_model.state_dict().items()}``); torch is not
needed.  Layouts: torch convs are OIHW and ours HWIO; torch Linear weights are (out, in)
and Dense kernels (in, out); timm builds atto..nano with ``conv_mlp=True``, whose fc
weights are 1x1 convs shaped (out, in, 1, 1): both are accepted on input, and
``convnext_to_timm(..., conv_mlp=True)`` writes that form.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convfirst_jax.convnext import ConvNeXt

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _timm_key(path: tuple) -> str:
  *prefix, leaf = (str(p) for p in path)
  return ".".join(prefix + [_LEAF_NAMES.get(leaf, leaf)])


def _to_ours(value: np.ndarray, target_shape: tuple, key: str) -> np.ndarray:
  value = np.asarray(value)
  if len(target_shape) == 4:            # OIHW -> HWIO (depthwise: (C,1,k,k) -> (k,k,1,C))
    value = value.transpose(2, 3, 1, 0)
  elif len(target_shape) == 2:          # Linear (out, in) or 1x1 conv (out, in, 1, 1)
    if value.ndim == 4:
      if value.shape[2:] != (1, 1):
        raise ValueError(f"{key}: expected a 1x1 conv weight, got shape {value.shape}")
      value = value[:, :, 0, 0]
    value = value.T
  if value.shape != tuple(target_shape):
    raise ValueError(f"{key}: shape {value.shape} after conversion does not match the "
                     f"model's {tuple(target_shape)}")
  return value


def convnext_from_timm(state_dict: Mapping[str, np.ndarray], model: ConvNeXt,
                       *, strict: bool = True) -> ConvNeXt:
  """Loads a timm ConvNeXt state dict into ``model`` (in place; also returned).

  Raises ValueError naming missing keys, unexpected keys (``strict``) and shape
  mismatches.  Parameters keep the model's parameter dtype.
  """
  if not isinstance(model, ConvNeXt):
    raise TypeError(f"expected a ConvNeXt, got {type(model).__name__}")
  params = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(params)
  wanted = {_timm_key(path): path for path, _ in flat}
  missing = sorted(set(wanted) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(wanted))
  if missing:
    raise ValueError(f"timm state dict lacks {len(missing)} parameters of the model, e.g. "
                     f"{missing[:5]}; is it the same ConvNeXt variant?")
  if strict and unexpected:
    raise ValueError(f"timm state dict has {len(unexpected)} keys the model does not, e.g. "
                     f"{unexpected[:5]} (pass strict=False to ignore them)")
  new = []
  for path, var in flat:
    key = _timm_key(path)
    value = _to_ours(state_dict[key], var.shape, key)
    new.append((path, var.replace(jnp.asarray(value, var.dtype))))
  nnx.update(model, nnx.from_flat_state(new))
  return model


def convnext_to_timm(model: ConvNeXt, *, conv_mlp: bool = False) -> dict[str, np.ndarray]:
  """Our ConvNeXt's parameters as a timm state dict of float32 numpy arrays."""
  if not isinstance(model, ConvNeXt):
    raise TypeError(f"expected a ConvNeXt, got {type(model).__name__}")
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = _timm_key(path)
    value = np.asarray(var[...], np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T
      if conv_mlp and ".mlp." in key:
        value = value[:, :, None, None]
    out[key] = np.ascontiguousarray(value)
  return out
