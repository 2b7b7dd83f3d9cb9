"""Public entry points for the BatchNorm-folded ConvFirst and MBConv blocks.

``implementation``: "xla" runs the reference (intermediates stored in x.dtype); "pallas" runs
the fused kernels -- for ConvFirst the Mosaic GPU MLP kernel after XLA's grouped conv where
it supports the call (see ``convfirst_forward_kernel``), else the single-launch kernel of
``pallas_triton`` -- and raises ``NotImplementedError`` naming
what it does not cover; None picks the kernel where it is supported (GPU backend, or
``interpret=True``) and the input has at least ``MIN_ROWS_FOR_PALLAS`` pixels (N*H*W), and
falls back to XLA otherwise -- except that for ``mbconv_block`` None
keeps XLA on a real GPU (it still picks a kernel with ``interpret=True``): one MBConv block
alone is at best ~1.1x XLA's (the Mosaic form, paying its layout passes; the single-launch
Pallas-Triton kernel was slower than XLA), so it is opt-in with ``implementation="pallas"``.
MBConv stages go through ``mbconv_stage``, which on a Hopper GPU runs the three-kernel Mosaic
form (``mosaic_gconv``: 1.23x XLA's 9-block 14x14x384 stage, H100 2026-11-27) where its
padded row layout is cheap enough (``mbconv_stage_kernel``); ConvFirst stages go through
``convfirst_stage``, which runs each block as the tensor-core grouped conv + the fused MLP
kernel in the same layout (``convfirst_stage_kernel``).  Under None both stage functions run
XLA below ``MIN_STAGE_BATCH_FOR_PALLAS`` (16) images per device, where whole models were
measured slower with any Pallas form.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from pallas_kernels import _sharding, mosaic_mlp
from pallas_kernels.convfirst_block import mosaic, mosaic_gconv, pallas_triton
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

# implementation=None keeps XLA for inputs of fewer pixels (N*H*W) than this.  H100,
# 2026-11-26, one ConvFirst block forward (k=3, E=4, bf16; scratch sweep recorded in
# benchmarks/RESULTS.md), Pallas vs XLA ms: 28x28x192 batch 1 (784 px) 0.065 vs 0.058, batch 2
# (1,568 px) 0.094 vs 0.058; but 56x56x96 batch 1 (3,136 px) 0.071 vs 0.076 and 28x28x192
# batch 4 (3,136 px) 0.058 vs 0.083.
MIN_ROWS_FOR_PALLAS = 2048


def _use_pallas(implementation, x, params, interpret: bool, name: str) -> bool:
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "xla":
    return False
  if implementation is None and not interpret and name not in _GPU_VERIFIED:
    return False
  if implementation is None and (
      _sharding.local_batch(x.shape[0]) * x.shape[1] * x.shape[2] < MIN_ROWS_FOR_PALLAS):
    return False  # (per device under a mesh: that is what each kernel call sees)
  reason = _pallas_unsupported_reason(x, params, interpret, name)
  if reason is None:
    return True
  if implementation == "pallas":
    raise NotImplementedError(reason)
  return False


FORWARD_KERNELS = ("mosaic", "triton")


def _pick_forward_kernel(name: str, forward_kernel: str | None, interpret: bool,
                        mosaic_reason) -> str:
  """"mosaic" where ``mosaic_reason()`` (why the Mosaic form cannot run, or None) allows,
  else "triton"; ``forward_kernel`` forces one ("mosaic" on an unsupported call raises
  NotImplementedError naming why)."""
  if forward_kernel not in (None, *FORWARD_KERNELS):
    raise ValueError(f"forward_kernel must be one of None, {FORWARD_KERNELS}, "
                     f"got {forward_kernel!r}")
  if forward_kernel == "triton":
    return "triton"
  reason = mosaic_mlp.device_unsupported_reason(interpret) or mosaic_reason()
  if reason is None:
    return "mosaic"
  if forward_kernel == "mosaic":
    raise NotImplementedError(f"{name}(forward_kernel='mosaic'): {reason}")
  return "triton"


def convfirst_forward_kernel(x, params, interpret: bool, forward_kernel: str | None = None) -> str:
  """The Pallas kernel a ConvFirst call runs: "mosaic" (XLA grouped conv + one Mosaic GPU
  kernel for the MLP, mosaic.py) where it supports the call (bfloat16/float16, C % 32 == 0,
  C <= 256, Hopper or the interpreter), else "triton" (the whole block in one
  Pallas-Triton kernel).  ``forward_kernel`` forces one; "mosaic" on an unsupported call
  raises NotImplementedError naming why."""
  return _pick_forward_kernel("convfirst_block", forward_kernel, interpret,
                              lambda: mosaic.unsupported_reason(x.shape, params, x.dtype))


def convfirst_block(x: jax.Array, params: ConvFirstBlockParams, *,
                    implementation: str | None = None, interpret: bool = False,
                    forward_kernel: str | None = None) -> jax.Array:
  """x + fc2(silu(fc1(gconv_kxk(x) + b0) + b1)) + b2, NHWC, group width 8, stride 1.

  forward_kernel: which Pallas kernel runs when Pallas is used (see
  ``convfirst_forward_kernel``); None = Mosaic GPU where supported, else Triton."""
  _check(x, params, x.shape[-1], "convfirst_block")
  if _use_pallas(implementation, x, params, interpret, "convfirst_block"):
    if convfirst_forward_kernel(x, params, interpret, forward_kernel) == "mosaic":
      fn = lambda x, p: mosaic.forward(x, p, interpret=interpret)
    else:
      fn = lambda x, p: pallas_triton.convfirst_block_pallas(x, p, interpret=interpret)
    return _sharding.map_batch(fn, (x,), (params,), batch=x.shape[0])
  return convfirst_block_reference(x, params)


def mbconv_forward_kernel(x, params, interpret: bool, forward_kernel: str | None = None) -> str:
  """The Pallas kernels an MBConv call runs: "mosaic" (``mosaic_gconv.mbconv_forward``: the
  three-kernel Mosaic GPU form with the tensor-core grouped conv) where it supports the call
  (Hopper or the interpreter, bfloat16/float16, k = 3, C and E multiples of 64), else
  "triton" (the single-launch Pallas-Triton kernel).  ``forward_kernel`` forces one;
  "mosaic" on an unsupported call raises NotImplementedError naming why."""
  return _pick_forward_kernel(
      "mbconv_block", forward_kernel, interpret,
      lambda: mosaic_gconv.mbconv_unsupported_reason(x.shape, params, x.dtype))


def mbconv_block(x: jax.Array, params: MBConvBlockParams, *,
                 implementation: str | None = None, interpret: bool = False,
                 forward_kernel: str | None = None) -> jax.Array:
  """x + fc2(silu(gconv_kxk(silu(fc1(x) + b1)) + b0)) + b2, NHWC, group width 8, stride 1.

  forward_kernel: which Pallas kernels run when Pallas is used (``mbconv_forward_kernel``):
  None = the Mosaic GPU form where it supports the call, else the Pallas-Triton kernel.
  One block alone pays the Mosaic form's layout passes (14x14x384, batch 128, H100
  2026-11-27: 0.358-0.367 ms with them vs 0.331-0.340 without, XLA 0.380-0.398); a stage of
  blocks should go through ``mbconv_stage``, which pays them once."""
  _check(x, params, params.fc1_kernel.shape[-1], "mbconv_block")
  if forward_kernel not in (None, *FORWARD_KERNELS):
    raise ValueError(f"forward_kernel must be one of None, {FORWARD_KERNELS}, "
                     f"got {forward_kernel!r}")
  if _use_pallas(implementation, x, params, interpret, "mbconv_block"):
    if mbconv_forward_kernel(x, params, interpret, forward_kernel) == "mosaic":
      fn = lambda x, p: mosaic_gconv.mbconv_forward(x, p, interpret=interpret)
    else:
      fn = lambda x, p: pallas_triton.mbconv_block_pallas(x, p, interpret=interpret)
    return _sharding.map_batch(fn, (x,), (params,), batch=x.shape[0])
  return mbconv_block_reference(x, params)


# implementation=None runs an MBConv stage in the Mosaic padded-row form when its kernels
# process at most this many rows per real pixel (``mosaic_gconv.row_overhead``).  H100,
# 2026-11-27: the 14x14x384 stage won at 1.16-1.25 rows per pixel (batch 64-256, two
# layouts), the 7x7x768 one lost at 1.55 (an older layout).  2026-11-28 (eleventh session,
# the persistent GEMM expand / project kernels): the 7x7x768 stage of 3 blocks at 1.39 /
# 1.35 rows per pixel (batch 128 / 256) 0.694 / 1.182 ms vs XLA 0.714 / 1.379, so 1.40
# takes it; 7x7 at batch 64 (1.47) is unmeasured.  H200, 2026-11-28 (fifteenth session,
# ``benchmarks.dispatch``): the 9-block 14x14x384 stage alone at batch 16 (1.39 rows per
# pixel) 0.504 vs XLA 0.592 ms, at 32 (1.27) 0.880 vs 0.953; and with 1.30 here (XLA for
# that stage at batch 16) whole models were slower at batch 16: convfirst_t 1.690 vs 1.529
# ms, convfirst_nano 1.059 vs 1.000.
MOSAIC_STAGE_MAX_ROW_OVERHEAD = 1.40


# implementation=None runs a whole stage (``convfirst_stage`` / ``mbconv_stage``: every form,
# the padded-row chain and the per-block kernels alike) in XLA below this many images per
# device.  H200, 2026-11-28 (benchmarks/RESULTS.md, "Small batches"): each stage alone,
# timed on the GPU in a compiled loop, mostly ran faster in a Pallas form even at batch 1
# (convfirst_t's 56x56x96 stage 0.089 ms block by block vs XLA 0.112), but the whole folded
# models lost with those forms at batches 1-8 -- convfirst_t 0.89 / 0.96 / 0.90 / 0.85x XLA's
# images/s at batch 1 / 2 / 4 / 8 (one call synchronised at a time), convfirst_nano 0.80 /
# 0.63 / 0.74 / 0.91x, convfirst_atto 0.62x at batch 1 -- and won from batch 16 (convfirst_t
# 1.09 / 1.09x at batch 16 in two runs, 1.22x at 32; convfirst_nano 0.90 / 1.03x at 16,
# 1.13 / 1.15x back to back).  Where the GPU time a stage saves is a few microseconds per
# kernel, what the Pallas calls cost around them inside a model (host launches, XLA's
# fusions and command buffers split at each custom call) is larger.
MIN_STAGE_BATCH_FOR_PALLAS = 16


def _small_stage(x, implementation) -> bool:
  """True where implementation=None keeps this stage in XLA (``MIN_STAGE_BATCH_FOR_PALLAS``)."""
  return (implementation is None
          and _sharding.local_batch(x.shape[0]) < MIN_STAGE_BATCH_FOR_PALLAS)


def _stage_kernel(x, params, implementation, interpret, unsupported_reason,
                  layout_under_none) -> str:
  """"mosaic" or "blocks" for a stage (``mbconv_stage_kernel``, ``convfirst_stage_kernel``):
  ``unsupported_reason(x_shape, p, dtype)`` says why the layout form cannot run a block,
  ``layout_under_none(n, h, w, c)`` (n per device) whether None takes it."""
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
        f"implementation must be one of None, {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "xla" or not params or _small_stage(x, implementation):
    return "blocks"
  reason = mosaic_mlp.device_unsupported_reason(interpret) or next(
      (r for p in params if (r := unsupported_reason(x.shape, p, x.dtype)) is not None), None)
  if reason is not None:
    return "blocks"
  if implementation is None and not layout_under_none(_sharding.local_batch(x.shape[0]),
                                                      *x.shape[1:]):
    return "blocks"
  return "mosaic"


STAGE_FORMS = ("xla", "blocks", "stage")


def stage_form(kind: str, x, params, *, implementation: str | None = None,
               interpret: bool = False) -> str:
  """How ``convfirst_stage`` (kind "convfirst") or ``mbconv_stage`` ("mbconv") runs this
  call: "stage" (the padded-row Mosaic chain, where ``*_stage_kernel`` says "mosaic"),
  "blocks" (one ``*_block`` call per block that runs its Pallas kernel -- for "pallas",
  which raises there what a block does not support) or "xla" (every block the XLA
  reference).  ``x`` may be a ``jax.ShapeDtypeStruct``."""
  if kind not in ("convfirst", "mbconv"):
    raise ValueError(f"kind must be 'convfirst' or 'mbconv', got {kind!r}")
  stage_kernel = convfirst_stage_kernel if kind == "convfirst" else mbconv_stage_kernel
  params = tuple(params)
  if stage_kernel(x, params, implementation=implementation, interpret=interpret) == "mosaic":
    return "stage"
  if implementation == "pallas":
    return "blocks"
  if (implementation == "xla" or not params or _small_stage(x, implementation)
      or not _use_pallas(None, x, params[0], interpret, f"{kind}_block")):
    return "xla"
  return "blocks"


def _stage(x, params, implementation, interpret, kind, conv_channels, stage_forward, block):
  """A stage of blocks as ``stage_form`` says: ``stage_forward`` (the padded-row chain, per
  device), or ``block`` applied with each params in turn."""
  params = tuple(params)
  for p in params:
    _check(x, p, conv_channels(p), f"{kind}_stage")
  form = stage_form(kind, x, params, implementation=implementation, interpret=interpret)
  if form == "stage":
    return _sharding.map_batch(lambda x, ps: stage_forward(x, ps, interpret=interpret),
                               (x,), (params,), batch=x.shape[0])
  for p in params:
    x = block(x, p, implementation="xla" if form == "xla" else implementation,
              interpret=interpret)
  return x


def mbconv_stage_kernel(x, params: Sequence[MBConvBlockParams], *,
                        implementation: str | None = None, interpret: bool = False) -> str:
  """How ``mbconv_stage`` runs these blocks: "mosaic" (the chain in the padded-row layout)
  or "blocks" (one ``mbconv_block`` call each, with this ``implementation``).

  "xla": "blocks".  "pallas": "mosaic" where the Mosaic form supports the call (Hopper GPU
  or interpret=True, bfloat16/float16, k = 3, C and E multiples of 64), else "blocks" (the
  Pallas-Triton kernel, which raises NotImplementedError for what it does not cover).
  None: "mosaic" where supported, the batch per device is at least
  ``MIN_STAGE_BATCH_FOR_PALLAS`` and ``mosaic_gconv.row_overhead`` is at most
  ``MOSAIC_STAGE_MAX_ROW_OVERHEAD``, else "blocks" (XLA on a GPU)."""
  return _stage_kernel(
      x, params, implementation, interpret, mosaic_gconv.mbconv_unsupported_reason,
      lambda n, h, w, c: mosaic_gconv.row_overhead(n, h, w) <= MOSAIC_STAGE_MAX_ROW_OVERHEAD)


def mbconv_stage(x: jax.Array, params: Sequence[MBConvBlockParams], *,
                 implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """A stage of MBConv blocks, ``mbconv_block`` applied with each ``params`` in turn.

  Where ``mbconv_stage_kernel`` says "mosaic", x enters the Mosaic form's padded-row layout
  once, each block is three Mosaic GPU kernels on it (expand + SiLU, the tensor-core
  grouped conv + SiLU, project + residual; ``mosaic_gconv.mbconv_rows``) and the pixels
  come out once; otherwise each block is one ``mbconv_block(x, p, implementation=...)`` (with
  implementation=None, ``implementation="xla"`` below ``MIN_STAGE_BATCH_FOR_PALLAS`` images
  per device)."""
  return _stage(x, params, implementation, interpret, "mbconv",
                lambda p: p.fc1_kernel.shape[-1], mosaic_gconv.mbconv_stage_forward,
                mbconv_block)


# implementation=None runs a ConvFirst stage in the Mosaic padded-row form when its kernels
# process at most this many rows per real pixel (``mosaic_gconv.row_overhead``) and it has
# at most MOSAIC_CONVFIRST_STAGE_MAX_C channels.  H100, 2026-11-27, three blocks (E=4,
# batch 128, ms; XLA / block by block with the Mosaic MLP kernel / padded-row stage):
# 56x56x96 2.349 / 1.299 / 1.127, but 28x28x192 1.154 / 0.685 / 0.730 -- at C=192 the
# per-block form (128-row MLP CTAs) wins: XLA's conv is relatively cheaper there
# (0.119 vs 0.062 ms for the Mosaic conv) and the layout passes relatively dearer (0.063 ms
# in, as much as at 56x56x96's twice larger tensor).
MOSAIC_CONVFIRST_STAGE_MAX_ROW_OVERHEAD = 1.25
MOSAIC_CONVFIRST_STAGE_MAX_C = 128


def convfirst_stage_kernel(x, params: Sequence[ConvFirstBlockParams], *,
                           implementation: str | None = None, interpret: bool = False) -> str:
  """How ``convfirst_stage`` runs these blocks: "mosaic" (the chain in the padded-row layout,
  ``mosaic_gconv.convfirst_stage_forward``) or "blocks" (one ``convfirst_block`` call each,
  with this ``implementation``).

  "xla": "blocks".  "pallas" and None: "mosaic" where the Mosaic form supports the call
  (Hopper GPU or interpret=True, bfloat16/float16, k = 3, C a multiple of 32) -- for None
  also only where ``mosaic_gconv.row_overhead`` is at most
  ``MOSAIC_CONVFIRST_STAGE_MAX_ROW_OVERHEAD``, C is at most
  ``MOSAIC_CONVFIRST_STAGE_MAX_C`` and the stage has at least ``MIN_ROWS_FOR_PALLAS``
  pixels and ``MIN_STAGE_BATCH_FOR_PALLAS`` images per device -- else "blocks" (under None
  below that batch the blocks run in XLA)."""
  return _stage_kernel(
      x, params, implementation, interpret, mosaic_gconv.convfirst_unsupported_reason,
      lambda n, h, w, c: (n * h * w >= MIN_ROWS_FOR_PALLAS and c <= MOSAIC_CONVFIRST_STAGE_MAX_C
                          and mosaic_gconv.row_overhead(n, h, w)
                          <= MOSAIC_CONVFIRST_STAGE_MAX_ROW_OVERHEAD))


def convfirst_stage(x: jax.Array, params: Sequence[ConvFirstBlockParams], *,
                    implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """A stage of ConvFirst blocks, ``convfirst_block`` applied with each ``params`` in turn.

  Where ``convfirst_stage_kernel`` says "mosaic", x enters the padded-row layout once, each
  block is two Mosaic GPU kernels on it (the tensor-core grouped conv + bias, then the
  fused expand / SiLU / project / residual kernel with the row mask;
  ``mosaic_gconv.convfirst_rows``) and the pixels come out once; otherwise each block is
  one ``convfirst_block(x, p, implementation=...)`` (with
  implementation=None, ``implementation="xla"`` below ``MIN_STAGE_BATCH_FOR_PALLAS`` images
  per device)."""
  return _stage(x, params, implementation, interpret, "convfirst",
                lambda p: x.shape[-1], mosaic_gconv.convfirst_stage_forward,
                convfirst_block)
