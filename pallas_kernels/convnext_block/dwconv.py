"""Depthwise "same" convolution with a choice of weight-gradient formulation.

XLA differentiates a depthwise conv (``feature_group_count = C``) into a forward conv, an
input-gradient conv (the same depthwise conv with mirrored taps) and a weight-gradient conv
with ``batch_group_count = C``.  On an H100 (jax 0.11.2, bfloat16, 2026-11-25,
``python -m benchmarks.dwconv_train``) that weight-gradient conv is fine at 14x14 and above
but pathologically slow when the image is no larger than the kernel, which is ConvNeXt's
last stage (7x7 images, 7x7 kernel): about 4.5 ms at batch 256 for every C from 320 to 1536
(1.3 ms at batch 64), 17x the depthwise conv's own forward (0.26 ms at 7x7x768), while at
14x14x768 it takes 0.52 ms.

The way around it: the weight gradient of a *grouped* conv with group width g (kernel
(k, k, g, C)) contains the depthwise one on its diagonal,

    dW[i, j, a, b*g + o] = sum_{n,h,w} xpad[n, h+i, w+j, b*g + a] * dy[n, h, w, b*g + o],

and a == o is the depthwise term.  It does g times the multiply-adds, but as small matrix
products on tensor cores, and XLA runs it in 0.24-0.78 ms (g = 64) at those shapes.

``wgrad``:
* ``"auto"`` (default): on a GPU backend, ``"grouped<g>"`` with the largest g in
  (64, 32, 16, 8) dividing C when both image sides are <= the kernel size, else ``"xla"`` --
  following the measurements above (at 14x14 and larger XLA's own weight gradient was the
  fastest formulation; at 1x1-4x4 images, batch 64, both took 0.12-0.33 ms, launch-bound).
  On other backends ``"xla"``: XLA:CPU's grouped conv is slow (convnext_atto's 32x32
  training step on a 2-core CPU: 0.61 s with "xla", 1.73 s with the grouped form).
* ``"xla"``: plain autodiff, XLA's own weight-gradient conv.
* ``"grouped8"`` ... ``"grouped64"``: the diagonal trick with that group width (falls back to
  ``"xla"`` when g does not divide C).
* ``"pallas"`` (with ``conv="pallas"`` only): the Pallas-Triton weight-gradient kernel
  ``dwconv_triton.depthwise_conv_wgrad`` (per-program partial sums of the 49 tap products,
  float32, reduced by XLA).
* ``"pallas_columns"`` (with ``conv="pallas"`` only): the same function's column-walk
  kernel (``WgradTiles(columns=True)``, default tiles): on an H100 (bf16, batch 128,
  2026-11-27) 0.226 / 0.120 / 0.068 / 0.059 ms at ConvNeXt-T's stage shapes vs XLA's
  0.229 / 0.132 / 0.099 / 2.136 and ``"pallas"``'s 0.629 at 56x56x96.

Forward and input gradient are XLA's unless ``conv="pallas"`` (then the Pallas-Triton
kernel of dwconv_triton.py runs both: the input gradient is the conv with mirrored taps).
All formulations compute the same gradient up to float32 accumulation order; like XLA's,
it is rounded to ``x.dtype`` before being cast to the kernel's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

WGRAD_METHODS = ("auto", "xla", "grouped8", "grouped16", "grouped32", "grouped64", "pallas",
                 "pallas_columns")
_PALLAS_WGRAD_TILES = {"pallas": None, "pallas_columns": "columns"}
_GROUP_WIDTHS = (64, 32, 16, 8)

# What ``convnext_block_reference`` (the XLA ConvNeXt block) passes as ``wgrad``; set it to
# "xla" to get plain autodiff everywhere (used by benchmarks/dwconv_train.py).
DEFAULT_WGRAD = "auto"


def _conv(x, kernel_hwio, groups):
  k = kernel_hwio.shape[0]
  pad = k // 2
  return jax.lax.conv_general_dilated(
      x, kernel_hwio, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _plain(x, kernel):
  k, _, c = kernel.shape
  return _conv(x, kernel.reshape(k, k, 1, c).astype(x.dtype), c)


def _wgrad_grouped(x, dy, k, g):
  c = x.shape[-1]
  w0 = jnp.zeros((k, k, g, c), x.dtype)
  _, vjp = jax.vjp(lambda w: _conv(x, w, c // g), w0)
  (dw,) = vjp(dy)                                       # (k, k, a, b*g + o)
  dw = dw.reshape(k, k, g, c // g, g)
  dw = jnp.diagonal(dw, axis1=2, axis2=4)               # (k, k, b, a)
  return dw.reshape(k, k, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _grouped_wgrad_conv(x, kernel, g):
  return _plain(x, kernel)


def _fwd(x, kernel, g):
  return _plain(x, kernel), (x, kernel)


def _bwd(g, res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  _, vjp_x = jax.vjp(lambda x_: _plain(x_, kernel), x)
  (dx,) = vjp_x(dy)
  dw = _wgrad_grouped(x, dy, kernel.shape[0], g)
  return dx, dw.astype(kernel.dtype)


_grouped_wgrad_conv.defvjp(_fwd, _bwd)


def resolve_wgrad(x_shape, kernel_size: int, wgrad: str = "auto",
                  backend: str | None = None) -> str:
  """The formulation ``depthwise_conv`` uses for this input shape: "xla" or "grouped<g>".
  ``backend``: the platform "auto" decides for (default ``jax.default_backend()``)."""
  if wgrad not in WGRAD_METHODS:
    raise ValueError(f"wgrad must be one of {WGRAD_METHODS}, got {wgrad!r}")
  _, h, w, c = x_shape
  if wgrad == "auto":
    if (backend or jax.default_backend()) != "gpu" or max(h, w) > kernel_size:
      return "xla"
    wgrad = next((f"grouped{g}" for g in _GROUP_WIDTHS if c % g == 0), "xla")
  if wgrad.startswith("grouped") and c % int(wgrad[len("grouped"):]):
    return "xla"
  return wgrad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pallas_conv(x, kernel, wgrad_method, interpret):
  from pallas_kernels.convnext_block import dwconv_triton
  return dwconv_triton.depthwise_conv(x, kernel, interpret=interpret)


def _pallas_fwd(x, kernel, wgrad_method, interpret):
  return _pallas_conv(x, kernel, wgrad_method, interpret), (x, kernel)


def _pallas_bwd(wgrad_method, interpret, res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  dx = _pallas_input_grad(dy, kernel, interpret)
  return dx, _pallas_wgrad(wgrad_method, interpret, x, kernel, dy)


def _pallas_input_grad(dy, kernel, interpret, residual=None, col_sums=False):
  """The Pallas conv's input gradient: the transpose of a "same" stride-1 depthwise conv is
  the same conv with mirrored taps (``residual`` and ``col_sums`` as in
  ``dwconv_triton.depthwise_conv``)."""
  from pallas_kernels.convnext_block import dwconv_triton
  return dwconv_triton.depthwise_conv(dy, kernel[::-1, ::-1], residual=residual,
                                      col_sums=col_sums, interpret=interpret)


def _pallas_wgrad(wgrad_method, interpret, x, kernel, dy):
  """The kernel gradient of the Pallas conv's VJPs, as ``wgrad_method`` says."""
  from pallas_kernels.convnext_block import dwconv_triton
  if wgrad_method == "xla":
    _, vjp_w = jax.vjp(lambda w: _plain(x, w), kernel)
    (dw,) = vjp_w(dy)
  elif wgrad_method in _PALLAS_WGRAD_TILES:  # rounded to x.dtype like the other formulations
    tiles = (dwconv_triton.WgradTiles(columns=True)
             if _PALLAS_WGRAD_TILES[wgrad_method] == "columns" else None)
    dw = dwconv_triton.depthwise_conv_wgrad(x, dy, kernel.shape[0], tiles=tiles,
                                            interpret=interpret).astype(x.dtype)
  else:
    dw = _wgrad_grouped(x, dy, kernel.shape[0], int(wgrad_method[len("grouped"):]))
  return dw.astype(kernel.dtype)


_pallas_conv.defvjp(_pallas_fwd, _pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_conv_and_x(x, kernel, bias, wgrad_method, interpret, has_bias):
  from pallas_kernels.convnext_block import dwconv_triton
  z = dwconv_triton.depthwise_conv(x, kernel, bias if has_bias else None, interpret=interpret)
  return z, x


def _pallas_and_x_fwd(x, kernel, bias, wgrad_method, interpret, has_bias):
  return (_pallas_conv_and_x(x, kernel, bias, wgrad_method, interpret, has_bias),
          (x, kernel, bias))


def _pallas_and_x_bwd(wgrad_method, interpret, has_bias, res, cotangents):
  dy, dx_through = cotangents
  x, kernel, bias = res
  dy = dy.astype(x.dtype)
  # The input gradient and the pass-through's cotangent in one pass of the conv kernel, and
  # with a bias its gradient (dy summed over pixels) from the same kernel's partial sums.
  out = _pallas_input_grad(dy, kernel, interpret, residual=dx_through.astype(x.dtype),
                           col_sums=has_bias)
  dx, dbias = out if has_bias else (out, jnp.zeros(bias.shape, jnp.float32))
  return (dx, _pallas_wgrad(wgrad_method, interpret, x, kernel, dy),
          dbias.astype(bias.dtype))


_pallas_conv_and_x.defvjp(_pallas_and_x_fwd, _pallas_and_x_bwd)

CONVS = ("xla", "pallas")


def _check_shapes(who: str, x: jax.Array, kernel: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"{who} expects NHWC input of rank 4, got shape {x.shape}")
  c = x.shape[-1]
  if kernel.ndim != 3 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != c:
    raise ValueError(f"{who}: kernel must be (k, k, {c}) for input {x.shape}, "
                     f"got {kernel.shape}")


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, wgrad: str = "auto", conv: str = "xla",
                   interpret: bool = False) -> jax.Array:
  """"Same" stride-1 depthwise conv of NHWC ``x`` with ``kernel`` (k, k, C) (cast to
  ``x.dtype``; float32 accumulation), no bias.  ``wgrad`` picks how the kernel gradient is
  computed (module docstring); the value is the same either way.  ``conv="pallas"``: the
  forward and the input gradient run the Pallas-Triton kernel (dwconv_triton.py; a GPU, or
  ``interpret=True``; the taps are used in float32 rather than rounded to x.dtype first),
  the kernel gradient as ``wgrad`` says."""
  _check_shapes("depthwise_conv", x, kernel)
  method = resolve_wgrad(x.shape, kernel.shape[0], wgrad)
  if conv not in CONVS:
    raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
  if method in _PALLAS_WGRAD_TILES and conv != "pallas":
    raise ValueError(f'wgrad="{method}" needs conv="pallas" (the Pallas conv\'s VJP runs it)')
  if conv == "pallas":
    return _pallas_conv(x, kernel, method, bool(interpret))
  if method == "xla":
    return _plain(x, kernel)
  return _grouped_wgrad_conv(x, kernel, int(method[len("grouped"):]))


def depthwise_conv_and_x(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                         wgrad: str = "auto",
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(depthwise_conv(x, kernel, wgrad=wgrad, conv="pallas") [+ bias], x)``, for a caller
  that also uses x elsewhere (a residual connection): the cotangent that reaches the second
  result is added to the conv's input gradient inside the Pallas kernel's pass, instead of
  XLA adding the two afterwards (one read of each and a write of x's size saved).  ``bias``
  (C,), optional, is added in float32 before the result is rounded to x's dtype; its
  gradient comes from the same input-gradient pass (per-program sums of the cotangent)
  rather than from a separate reduction over it."""
  _check_shapes("depthwise_conv_and_x", x, kernel)
  c = x.shape[-1]
  if bias is not None and tuple(bias.shape) != (c,):
    raise ValueError(f"depthwise_conv_and_x: bias must be ({c},) for input {x.shape}, "
                     f"got {tuple(bias.shape)}")
  has_bias = bias is not None
  b = bias if has_bias else jnp.zeros((c,), jnp.float32)
  return _pallas_conv_and_x(x, kernel, b, resolve_wgrad(x.shape, kernel.shape[0], wgrad),
                            bool(interpret), has_bias)
