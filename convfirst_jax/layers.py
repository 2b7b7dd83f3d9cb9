"""Small building blocks shared by the model families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

IMPLEMENTATIONS = (None, "xla", "pallas")


def check_implementation(implementation: str | None) -> str | None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"block implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  return implementation


class DropPath(nnx.Module):
  """Stochastic depth: per-sample scale of a residual branch.

  Returns an (N,) vector of 0 or 1/keep_prob in training (``deterministic=False``) and
  ``None`` when the branch is kept as is (eval mode, or rate 0).  Returning the scale
  rather than applying it lets a fused block kernel apply it inside the kernel.
  """

  def __init__(self, rate: float, *, deterministic: bool = False,
               rngs: nnx.Rngs | None = None):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    self.rate = rate
    self.deterministic = deterministic
    if rate > 0.0:
      if rngs is None:
        raise ValueError("DropPath with rate > 0 needs rngs (an nnx.Rngs with a 'dropout' stream)")
      self.rngs = rngs["dropout"].fork()
    else:
      self.rngs = nnx.data(None)

  def scale(self, batch: int) -> jax.Array | None:
    if self.deterministic or self.rate == 0.0:
      return None
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.rngs(), keep, (batch,))
    return mask.astype(jnp.float32) / keep


def apply_drop_path(branch: jax.Array, scale: jax.Array | None) -> jax.Array:
  if scale is None:
    return branch
  return branch * scale.reshape((-1,) + (1,) * (branch.ndim - 1)).astype(branch.dtype)


def check_input(x: jax.Array, channels: int, min_size: int, model: str) -> None:
  """Clear errors for the usual input mistakes (rank, channels, too small)."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects NHWC images of rank 4 (batch, height, width, {channels}), "
        f"got an array of shape {x.shape}")
  if x.shape[-1] != channels:
    raise ValueError(
        f"{model} expects {channels} input channels (NHWC, last axis), got {x.shape[-1]} "
        f"(input shape {x.shape}); is the input NCHW?")
  h, w = x.shape[1], x.shape[2]
  if h < min_size or w < min_size:
    raise ValueError(
        f"{model} needs height and width of at least {min_size} (its total stride), "
        f"got {h}x{w}")
