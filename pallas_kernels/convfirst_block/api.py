"""Public entry points for the BatchNorm-folded ConvFirst and MBConv blocks.

Only the XLA implementation exists so far; the fused Pallas kernels plug in here."""

from __future__ import annotations

import jax

from pallas_kernels.convfirst_block.reference import (
    ConvFirstBlockParams,
    MBConvBlockParams,
    convfirst_block_reference,
    mbconv_block_reference,
)

IMPLEMENTATIONS = ("xla", "pallas")


def _dispatch(implementation: str | None, name: str) -> None:
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "pallas":
    raise NotImplementedError(f"the fused Pallas {name} kernel is not implemented yet")


def convfirst_block(x: jax.Array, params: ConvFirstBlockParams, *,
                    implementation: str | None = None, interpret: bool = False) -> jax.Array:
  _dispatch(implementation, "convfirst_block")
  del interpret
  return convfirst_block_reference(x, params)


def mbconv_block(x: jax.Array, params: MBConvBlockParams, *,
                 implementation: str | None = None, interpret: bool = False) -> jax.Array:
  _dispatch(implementation, "mbconv_block")
  del interpret
  return mbconv_block_reference(x, params)
