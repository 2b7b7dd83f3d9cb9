"""Pure-jnp ConvNeXt block: the definition of "correct" and the XLA implementation.

    y = x + drop_path_scale[n] * gamma * fc2(gelu(fc1(LayerNorm(dwconv7x7(x) + b))))

All activations are NHWC.  Parameters may be float32 while ``x`` is bfloat16.  This is
also the ``implementation="xla"`` path, so it is written the way a framework runs the block:
convolution and matmul operands in ``x.dtype`` with float32 accumulation, LayerNorm
statistics in float32, and intermediates (conv output, normalised input, the 4C-wide hidden
activation, the branch output) stored in ``x.dtype``.  In float32 that is exact; in
bfloat16 the fused kernel, which keeps intermediates in float32 on chip, is the more
accurate of the two (the difference is bfloat16 rounding, about 1e-2 relative).  Keeping
the XLA path's intermediates in bfloat16 matters for speed: storing the 4C-wide hidden
activation in float32 made XLA's block 1.3x slower forward and 3x slower forward+backward
(H100, 56x56x96, batch 128, 2026-11-24).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.convnext_block import dwconv


class ConvNeXtBlockParams(NamedTuple):
  """Parameters of one ConvNeXt block, in the layout the kernels take.

  dw_kernel:  (k, k, C) depthwise kernel (flax ``nnx.Conv`` stores (k, k, 1, C)).
  dw_bias:    (C,)
  ln_scale:   (C,)
  ln_bias:    (C,)
  fc1_kernel: (C, hidden)   hidden = mlp_ratio * C, usually 4C
  fc1_bias:   (hidden,)
  fc2_kernel: (hidden, C)
  fc2_bias:   (C,)
  gamma:      (C,) layer scale; pass ones when the block has no layer scale.
  """

  dw_kernel: jax.Array
  dw_bias: jax.Array
  ln_scale: jax.Array
  ln_bias: jax.Array
  fc1_kernel: jax.Array
  fc1_bias: jax.Array
  fc2_kernel: jax.Array
  fc2_bias: jax.Array
  gamma: jax.Array


def validate(x: jax.Array, params: ConvNeXtBlockParams) -> None:
  """Raises ValueError naming the problem when x and params do not fit together."""
  if x.ndim != 4:
    raise ValueError(f"convnext_block expects NHWC input of rank 4, got shape {x.shape}")
  if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"convnext_block supports float32/bfloat16/float16 input, got {x.dtype}")
  c = x.shape[-1]
  k = params.dw_kernel.shape[0]
  hidden = params.fc1_kernel.shape[-1]
  expected = {
      "dw_kernel": (k, k, c), "dw_bias": (c,), "ln_scale": (c,), "ln_bias": (c,),
      "fc1_kernel": (c, hidden), "fc1_bias": (hidden,), "fc2_kernel": (hidden, c),
      "fc2_bias": (c,), "gamma": (c,),
  }
  for name, shape in expected.items():
    actual = tuple(getattr(params, name).shape)
    if actual != shape:
      raise ValueError(
          f"convnext_block: params.{name} has shape {actual}, expected {shape} for input "
          f"with {c} channels (x.shape={x.shape})")


def convnext_block_reference(
    x: jax.Array,
    params: ConvNeXtBlockParams,
    drop_path_scale: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    dw_wgrad: str | None = None,
    dw_conv: str = "xla",
    interpret: bool = False,
) -> jax.Array:
  """The whole block in plain XLA ops.  ``drop_path_scale``: optional (N,) per-sample
  multiplier of the residual branch (0 or 1/keep_prob for stochastic depth).
  ``dw_wgrad``: how the depthwise kernel's gradient is computed (``dwconv.depthwise_conv``;
  None = ``dwconv.DEFAULT_WGRAD``, i.e. "auto"); the block's value and gradients are the same
  up to float32 accumulation order.  ``dw_conv="pallas"`` runs the depthwise conv's forward
  and input gradient with the Pallas-Triton kernel (``interpret`` for its interpreter); the
  default "xla" keeps the block pure XLA."""
  validate(x, params)
  dtype = x.dtype
  if dw_conv == "pallas":  # the residual's and the bias's gradients join the conv kernel's
    z, x = dwconv.depthwise_conv_and_x(x, params.dw_kernel, params.dw_bias,  # input pass
                                       wgrad=dw_wgrad or dwconv.DEFAULT_WGRAD,
                                       interpret=interpret)
    z = z.astype(jnp.float32)
  else:
    z = dwconv.depthwise_conv(x, params.dw_kernel, wgrad=dw_wgrad or dwconv.DEFAULT_WGRAD,
                              conv=dw_conv, interpret=interpret)
    z = (z + params.dw_bias.astype(dtype)).astype(jnp.float32)
  mean = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(z - mean), axis=-1, keepdims=True)
  zn = (z - mean) * jax.lax.rsqrt(var + eps)
  zn = zn * params.ln_scale.astype(jnp.float32) + params.ln_bias.astype(jnp.float32)
  h = jnp.dot(zn.astype(dtype), params.fc1_kernel.astype(dtype))
  h = jax.nn.gelu(h + params.fc1_bias.astype(dtype), approximate=False)
  out = jnp.dot(h, params.fc2_kernel.astype(dtype))
  out = (out + params.fc2_bias.astype(dtype)) * params.gamma.astype(dtype)
  if drop_path_scale is not None:
    out = out * drop_path_scale.astype(dtype).reshape(-1, 1, 1, 1)
  return x + out
