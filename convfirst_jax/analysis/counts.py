"""Analytic per-layer counts from shapes alone: parameters, multiply-adds, FLOPs and the
minimum DRAM bytes (every input, weight and output moved exactly once).

``layer_counts(model, image_size, batch)`` walks a ConvNeXt or ConvFirstNet (training or
folded form) in execution order and returns one ``LayerCount`` per layer, each tagged with
the residual block (or stem / downsample / head) it belongs to.  Only parameter *shapes*
are read, so it also works on ``nnx.eval_shape`` models that hold no memory.

Conventions: a multiply-add (MAC) is one multiply plus one add = 2 FLOPs.  ``macs`` counts
convolutions and matmuls only (the number timm / torch report, 4.456 G for ConvNeXt-T);
``flops`` adds element-wise work (norms, activations, residual adds, biases) with the
per-element costs in ``ELEMENTWISE_FLOPS``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from flax import nnx

# FLOPs per element for the element-wise layers (a convention, stated so it can be checked).
ELEMENTWISE_FLOPS = {
    "layernorm": 8,   # mean, var (sub, square, add), normalise (sub, mul), affine (mul, add)
    "batchnorm": 2,   # eval / folded: one multiply-add per element
    "gelu": 8,
    "silu": 4,
    "scale": 1,       # layer scale gamma
    "add": 1,         # residual add
    "pool": 1,
}


@dataclasses.dataclass(frozen=True)
class LayerCount:
  name: str             # module path, e.g. "stages.0.blocks.1.mlp.fc1"
  kind: str             # conv | dwconv | gconv | dense | layernorm | batchnorm | gelu | ...
  block: str            # the residual block / stem / downsample / head it belongs to
  in_shape: tuple       # NHWC (or N, C after pooling)
  out_shape: tuple
  params: int           # trainable parameter elements (BatchNorm: scale and bias)
  macs: int             # multiply-adds of convolutions and matmuls
  flops: int            # 2 * macs + element-wise FLOPs (+ biases)
  extra_inputs: tuple = ()  # shapes of other activation inputs (the residual add's skip)

  @property
  def in_elems(self) -> int:
    return _numel(self.in_shape) + sum(_numel(s) for s in self.extra_inputs)

  @property
  def out_elems(self) -> int:
    return _numel(self.out_shape)

  def min_bytes(self, itemsize: int = 2, param_itemsize: int | None = None) -> int:
    """Each input, weight and output moved through DRAM once (unfused layer)."""
    p = itemsize if param_itemsize is None else param_itemsize
    return (self.in_elems + self.out_elems) * itemsize + self.params * p

  def intensity(self, itemsize: int = 2) -> float:
    """Operational intensity, FLOP per minimum DRAM byte."""
    return self.flops / max(self.min_bytes(itemsize), 1)


@dataclasses.dataclass(frozen=True)
class BlockCount:
  """A group of layers run as one fused kernel: only its input(s), weights and output
  touch DRAM."""
  name: str
  layers: tuple[LayerCount, ...]

  @property
  def params(self) -> int:
    return sum(l.params for l in self.layers)

  @property
  def macs(self) -> int:
    return sum(l.macs for l in self.layers)

  @property
  def flops(self) -> int:
    return sum(l.flops for l in self.layers)

  @property
  def in_shape(self):
    return self.layers[0].in_shape

  @property
  def out_shape(self):
    return self.layers[-1].out_shape

  def min_bytes(self, itemsize: int = 2, param_itemsize: int | None = None) -> int:
    """Fused: the block's input, weights and output, once each."""
    p = itemsize if param_itemsize is None else param_itemsize
    return ((_numel(self.in_shape) + _numel(self.out_shape)) * itemsize
            + self.params * p)

  def unfused_min_bytes(self, itemsize: int = 2, param_itemsize: int | None = None) -> int:
    """Every layer its own kernel: every intermediate written and read back."""
    return sum(l.min_bytes(itemsize, param_itemsize) for l in self.layers)


def _numel(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


class _Walker:
  def __init__(self, batch: int):
    self.batch = batch
    self.layers: list[LayerCount] = []

  def _add(self, name, kind, block, in_shape, out_shape, params, macs, elementwise=0,
           extra_inputs=()):
    flops = 2 * macs + elementwise * _numel(out_shape)
    self.layers.append(LayerCount(name, kind, block, tuple(in_shape), tuple(out_shape),
                                  int(params), int(macs), int(flops), tuple(extra_inputs)))
    return tuple(out_shape)

  def conv(self, name, block, conv: nnx.Conv, shape, kind=None):
    kh, kw, cin_g, cout = conv.kernel.shape
    sh, sw = conv.strides if isinstance(conv.strides, tuple) else (conv.strides,) * 2
    n, h, w, cin = shape
    if conv.padding == "SAME":
      ho, wo = -(-h // sh), -(-w // sw)
    else:
      ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = (n, ho, wo, cout)
    groups = cin // cin_g
    if kind is None:
      kind = "conv" if groups == 1 else ("dwconv" if cin_g == 1 else "gconv")
    params = kh * kw * cin_g * cout + (cout if conv.bias is not None else 0)
    macs = _numel(out) * kh * kw * cin_g
    bias = 1 if conv.bias is not None else 0
    return self._add(name, kind, block, shape, out, params, macs, bias)

  def raw_conv(self, name, block, kernel_shape, bias, shape):
    """A conv given by its kernel shape (k, k, cin/groups, cout), stride 1, same padding."""
    kh, kw, cin_g, cout = kernel_shape
    out = tuple(shape[:3]) + (cout,)
    kind = "dwconv" if cin_g == 1 else ("gconv" if cin_g != shape[-1] else "conv")
    params = kh * kw * cin_g * cout + (cout if bias else 0)
    return self._add(name, kind, block, shape, out, params, _numel(out) * kh * kw * cin_g,
                     1 if bias else 0)

  def dense(self, name, block, din, dout, bias, shape):
    out = tuple(shape[:-1]) + (dout,)
    params = din * dout + (dout if bias else 0)
    return self._add(name, "dense", block, shape, out, params, _numel(out) * din,
                     1 if bias else 0)

  def linear(self, name, block, lin: nnx.Linear, shape):
    din, dout = lin.kernel.shape
    return self.dense(name, block, din, dout, lin.bias is not None, shape)

  def norm(self, name, block, kind, shape, params):
    return self._add(name, kind, block, shape, shape, params, 0, ELEMENTWISE_FLOPS[kind])

  def elementwise(self, name, block, kind, shape, params=0, extra_inputs=()):
    return self._add(name, kind, block, shape, shape, params, 0, ELEMENTWISE_FLOPS[kind],
                     extra_inputs)

  def pool(self, name, block, shape):
    out = (shape[0], shape[-1])
    self.layers.append(LayerCount(name, "pool", block, tuple(shape), out, 0, 0,
                                  _numel(shape), ()))
    return out


def _convnext(model, w: _Walker, shape):
  shape = w.conv("stem.0", "stem", model.stem[0], shape)
  shape = w.norm("stem.1", "stem", "layernorm", shape, 2 * shape[-1])
  for i, stage in enumerate(model.stages):
    if stage.downsample is not None:
      blk = f"stages.{i}.downsample"
      shape = w.norm(f"{blk}.0", blk, "layernorm", shape, 2 * shape[-1])
      shape = w.conv(f"{blk}.1", blk, stage.downsample[1], shape)
    for j, b in enumerate(stage.blocks):
      blk = f"stages.{i}.blocks.{j}"
      x_shape = shape
      h = w.conv(f"{blk}.conv_dw", blk, b.conv_dw, shape)
      h = w.norm(f"{blk}.norm", blk, "layernorm", h, 2 * h[-1])
      h = w.linear(f"{blk}.mlp.fc1", blk, b.mlp.fc1, h)
      h = w.elementwise(f"{blk}.mlp.act", blk, "gelu", h)
      h = w.linear(f"{blk}.mlp.fc2", blk, b.mlp.fc2, h)
      if b.gamma is not None:
        h = w.elementwise(f"{blk}.gamma", blk, "scale", h, params=h[-1])
      shape = w.elementwise(f"{blk}.add", blk, "add", h, extra_inputs=(x_shape,))
  return shape


def _convfirst(model, w: _Walker, shape):
  from convfirst_jax.convfirst import ConvFirstBlock, FoldedConvFirstBlock, MBConvBlock

  def conv_bn(prefix, blk, cbn, shape):
    shape = w.conv(f"{prefix}.conv", blk, cbn.conv, shape)
    if cbn.bn is not None:
      shape = w.norm(f"{prefix}.bn", blk, "batchnorm", shape, 2 * shape[-1])
    return shape

  def bn(name, blk, shape):
    return w.norm(name, blk, "batchnorm", shape, 2 * shape[-1])

  shape = conv_bn("stem", "stem", model.stem, shape)
  for i, stage in enumerate(model.stages):
    if stage.downsample is not None:
      blk = f"stages.{i}.downsample"
      shape = conv_bn(blk, blk, stage.downsample, shape)
    for j, b in enumerate(stage.blocks):
      blk = f"stages.{i}.blocks.{j}"
      x_shape = shape
      if isinstance(b, (ConvFirstBlock, MBConvBlock)):   # training form, with BatchNorm
        def gconv(h):
          h = w.conv(f"{blk}.conv_group", blk, b.conv_group, h)
          return bn(f"{blk}.bn_group", blk, h)

        def fc(name, lin, bn_name, h):
          return bn(f"{blk}.{bn_name}", blk, w.linear(f"{blk}.{name}", blk, lin, h))
        if isinstance(b, ConvFirstBlock):
          h = gconv(shape)
          h = w.elementwise(f"{blk}.act", blk, "silu", fc("fc1", b.fc1, "bn1", h))
        else:
          h = w.elementwise(f"{blk}.act1", blk, "silu", fc("fc1", b.fc1, "bn1", shape))
          h = w.elementwise(f"{blk}.act2", blk, "silu", gconv(h))
        h = fc("fc2", b.fc2, "bn2", h)
      else:                                                 # folded form
        d_in, d_hidden = b.fc1_kernel.shape
        ks = b.conv_kernel.shape
        if isinstance(b, FoldedConvFirstBlock):
          h = w.raw_conv(f"{blk}.conv", blk, ks, True, shape)
          h = w.dense(f"{blk}.fc1", blk, d_in, d_hidden, True, h)
          h = w.elementwise(f"{blk}.act", blk, "silu", h)
        else:
          h = w.dense(f"{blk}.fc1", blk, d_in, d_hidden, True, shape)
          h = w.elementwise(f"{blk}.act1", blk, "silu", h)
          h = w.raw_conv(f"{blk}.conv", blk, ks, True, h)
          h = w.elementwise(f"{blk}.act2", blk, "silu", h)
        h = w.dense(f"{blk}.fc2", blk, d_hidden, d_in, True, h)
      shape = w.elementwise(f"{blk}.add", blk, "add", h, extra_inputs=(x_shape,))
  return shape


def _head(model, w: _Walker, shape):
  shape = w.pool("head.pool", "head", shape)
  if model.head is not None:
    shape = w.norm("head.norm", "head", "layernorm", shape, 2 * shape[-1])
    shape = w.linear("head.fc", "head", model.head.fc, shape)
  return shape


def layer_counts(model: nnx.Module, image_size: int | tuple[int, int] = 224,
                 batch: int = 1) -> list[LayerCount]:
  """Per-layer counts of a ConvNeXt or ConvFirstNet for ``batch`` images of
  ``image_size`` (int or (H, W)), in execution order."""
  from convfirst_jax.convfirst import ConvFirstNet
  from convfirst_jax.convnext import ConvNeXt
  h, wd = (image_size, image_size) if isinstance(image_size, int) else image_size
  if min(h, wd) < model.total_stride:
    raise ValueError(f"image size {h}x{wd} is smaller than the model's total stride "
                     f"{model.total_stride}")
  walker = _Walker(batch)
  shape = (batch, h, wd, model.in_chans)
  if isinstance(model, ConvNeXt):
    shape = _convnext(model, walker, shape)
  elif isinstance(model, ConvFirstNet):
    shape = _convfirst(model, walker, shape)
  else:
    raise TypeError(f"layer_counts supports ConvNeXt and ConvFirstNet, got {type(model).__name__}")
  _head(model, walker, shape)
  return walker.layers


def block_counts(layers: list[LayerCount]) -> list[BlockCount]:
  """Groups layers by residual block (and stem / downsample / head), in order."""
  groups: OrderedDict[str, list[LayerCount]] = OrderedDict()
  for l in layers:
    groups.setdefault(l.block, []).append(l)
  return [BlockCount(name, tuple(ls)) for name, ls in groups.items()]


def stage_of(block_name: str) -> str:
  parts = block_name.split(".")
  return f"stage{parts[1]}" if parts[0] == "stages" else parts[0]


def summary_rows(model: nnx.Module, image_size=224, batch: int = 1, itemsize: int = 2):
  """Per-stage rows: name, params, MACs, unfused and fused minimum bytes."""
  layers = layer_counts(model, image_size, batch)
  rows: OrderedDict[str, dict] = OrderedDict()
  for blk in block_counts(layers):
    r = rows.setdefault(stage_of(blk.name), dict(params=0, macs=0, flops=0,
                                                  unfused_bytes=0, fused_bytes=0, blocks=0))
    r["params"] += blk.params
    r["macs"] += blk.macs
    r["flops"] += blk.flops
    r["unfused_bytes"] += blk.unfused_min_bytes(itemsize)
    r["fused_bytes"] += blk.min_bytes(itemsize)
    r["blocks"] += 1
  return rows
