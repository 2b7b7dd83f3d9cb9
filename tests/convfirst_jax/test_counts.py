"""Analytic parameter and multiply-add counts against timm and XLA."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import convfirst_jax as cj
from convfirst_jax.analysis import block_counts, layer_counts

# timm 1.0.29, num_classes=1000 (the design notes' reference counts).
TIMM_PARAMS = {
    "convnext_atto": 3_695_520, "convnext_femto": 5_217_784, "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560, "convnext_tiny": 28_589_128, "convnext_small": 50_223_688,
    "convnext_base": 88_591_464, "convnext_large": 197_767_336,
}


def _abstract(name, **kw):
  return nnx.eval_shape(lambda: cj.create_model(name, **kw))


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_convnext_parameter_counts_match_timm(name):
  model = _abstract(name)
  actual = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert actual == TIMM_PARAMS[name]
  assert sum(l.params for l in layer_counts(model, 224)) == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", [n for n in cj.list_models() if n.startswith("convfirst")])
def test_convfirst_analytic_params_equal_model_params(name):
  model = _abstract(name)
  actual = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert sum(l.params for l in layer_counts(model, 224)) == actual


def test_convnext_tiny_macs():
  macs = sum(l.macs for l in layer_counts(_abstract("convnext_tiny"), 224))
  assert round(macs / 1e9, 3) == 4.456
  assert macs == 4_455_531_264


def test_convfirst_t_is_about_convnext_t():
  cf = sum(l.macs for l in layer_counts(_abstract("convfirst_t"), 224))
  cn = sum(l.macs for l in layer_counts(_abstract("convnext_tiny"), 224))
  assert abs(cf / cn - 1) < 0.1


def test_block_macs_by_hand():
  # ConvNeXt block at 56x56x96: 49*96 dwconv + 2*96*384 matmul MACs per pixel.
  blocks = block_counts(layer_counts(_abstract("convnext_tiny"), 224, batch=2))
  b = next(b for b in blocks if b.name == "stages.0.blocks.0")
  assert b.macs == 2 * 56 * 56 * (49 * 96 + 2 * 96 * 384)
  # Fused: read x, write y, weights once (bf16).
  weights = 49 * 96 + 96 + 2 * 96 + 96 * 384 + 384 + 384 * 96 + 96 + 96
  assert b.params == weights
  assert b.min_bytes(2) == 2 * (2 * 2 * 56 * 56 * 96 + weights)
  # ConvFirst block at 56x56x96, E=4, k=3, group width 8.
  blocks = block_counts(layer_counts(_abstract("convfirst_t"), 224))
  b = next(b for b in blocks if b.name == "stages.0.blocks.0")
  assert b.macs == 56 * 56 * (9 * 8 * 96 + 2 * 96 * 384)


def _in_bounds_fraction(h, w, k):
  """Share of a k x k "same" conv's taps that fall inside an h x w image: XLA's cost
  analysis counts only those, while our MACs (like timm's and torch's counters) count all."""
  p = k // 2
  taps = lambda n: sum(min(i + p, n - 1) - max(i - p, 0) + 1 for i in range(n))
  return taps(h) * taps(w) / (h * w * k * k)


@pytest.mark.parametrize("name", ["convnext_atto", "convfirst_atto"])
def test_analytic_macs_match_xla_cost_analysis(name):
  model = cj.create_model(name, num_classes=10, rngs=0)
  model.eval()
  if name.startswith("convfirst"):
    model = cj.fold_batchnorm(model)
  graphdef, state = nnx.split(model)
  x = jnp.zeros((2, 64, 64, 3))
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  cost = fn.lower(state, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  layers = layer_counts(model, 64, batch=2)
  xla_style_matmul_flops = 0.0
  for l in layers:
    f = 2 * l.macs
    if l.kind in ("dwconv", "gconv"):
      f *= _in_bounds_fraction(l.in_shape[1], l.in_shape[2], 7 if name.startswith("convnext") else 3)
    xla_style_matmul_flops += f
  elementwise = sum(l.flops - 2 * l.macs for l in layers)
  # XLA prices an exact GELU (erf) at 64 FLOPs an element.
  gelu_elements = sum(l.out_elems for l in layers if l.kind == "gelu")
  # XLA's count = the conv / matmul part exactly, plus its own element-wise convention.
  extra = cost["flops"] - xla_style_matmul_flops
  assert 0 <= extra <= 3 * elementwise + 64 * gelu_elements, (
      cost["flops"], xla_style_matmul_flops, elementwise)
