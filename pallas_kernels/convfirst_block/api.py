"""Public entry points for the BatchNorm-folded ConvFirst and MBConv blocks.

``implementation``: "xla" runs the reference (intermediates stored in x.dtype); "pallas" runs
the fused single-launch kernel of ``pallas_triton`` and raises ``NotImplementedError`` naming
what it does not cover; None picks the kernel where it is supported (GPU backend, or
``interpret=True``) and falls back to XLA otherwise -- except that for ``mbconv_block`` None
keeps XLA on a real GPU (it still picks the kernel with ``interpret=True``): the MBConv kernel
in this revision has passed its tests only in interpret mode (its previous revision overflowed
shared memory on an H100), so it is opt-in with ``implementation="pallas"`` until it has been
checked and timed on a GPU (``python -m benchmarks.blocks_convfirst --check --sweep``).
"""

from __future__ import annotations

import jax

from pallas_kernels.convfirst_block import pallas_triton
from pallas_kernels.convfirst_block.common import pallas_gpu_unsupported_reason
from pallas_kernels.convfirst_block.reference import (
    ConvFirstBlockParams,
    MBConvBlockParams,
    _check,
    convfirst_block_reference,
    mbconv_block_reference,
)

IMPLEMENTATIONS = ("xla", "pallas")


def _pallas_unsupported_reason(x, params, interpret: bool, name: str) -> str | None:
  reason = pallas_gpu_unsupported_reason(interpret)
  if reason is not None:
    return f"fused Pallas {name}: {reason}"
  try:
    pallas_triton.check_supported(x, params.conv_kernel.shape[0], name)
  except NotImplementedError as e:
    return str(e)
  return None


# Kernels that None picks on a GPU; the others run there only when asked for by name.
_GPU_VERIFIED = {"convfirst_block"}


def _use_pallas(implementation, x, params, interpret: bool, name: str) -> bool:
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "xla":
    return False
  if implementation is None and not interpret and name not in _GPU_VERIFIED:
    return False
  reason = _pallas_unsupported_reason(x, params, interpret, name)
  if reason is None:
    return True
  if implementation == "pallas":
    raise NotImplementedError(reason)
  return False


def convfirst_block(x: jax.Array, params: ConvFirstBlockParams, *,
                    implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """x + fc2(silu(fc1(gconv_kxk(x) + b0) + b1)) + b2, NHWC, group width 8, stride 1."""
  _check(x, params, x.shape[-1], "convfirst_block")
  if _use_pallas(implementation, x, params, interpret, "convfirst_block"):
    return pallas_triton.convfirst_block_pallas(x, params, interpret=interpret)
  return convfirst_block_reference(x, params)


def mbconv_block(x: jax.Array, params: MBConvBlockParams, *,
                 implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """x + fc2(silu(gconv_kxk(silu(fc1(x) + b1)) + b0)) + b2, NHWC, group width 8, stride 1."""
  _check(x, params, params.fc1_kernel.shape[-1], "mbconv_block")
  if _use_pallas(implementation, x, params, interpret, "mbconv_block"):
    return pallas_triton.mbconv_block_pallas(x, params, interpret=interpret)
  return mbconv_block_reference(x, params)
