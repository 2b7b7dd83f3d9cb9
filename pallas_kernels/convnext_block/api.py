"""Public entry point: ``convnext_block(x, params, implementation=...)``.

Placeholder dispatch: only the XLA implementation exists so far; the Pallas kernel
plugs in here (see issue: fused ConvNeXt block)."""

from __future__ import annotations

import jax

from pallas_kernels.convnext_block.reference import (
    ConvNeXtBlockParams,
    convnext_block_reference,
)

IMPLEMENTATIONS = ("xla", "pallas")


def convnext_block(
    x: jax.Array,
    params: ConvNeXtBlockParams,
    drop_path_scale: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "pallas":
    raise NotImplementedError("the Pallas ConvNeXt block kernel is not implemented yet")
  del interpret
  return convnext_block_reference(x, params, drop_path_scale, eps=eps)
