"""Waterline analysis: per-layer counts by hand and against XLA, the two partitions, the
device table, block timing (on CPU), plots and the command line."""

import json

import jax
import jax.numpy as jnp
import matplotlib.image
import pytest
from flax import nnx

import convfirst_jax as cj
from convfirst_jax.analysis import (
    DEVICES,
    Device,
    analyze,
    block_counts,
    get_device,
    kernel_floor,
    layer_counts,
    measure_ceilings,
)
from convfirst_jax.analysis.counts import _Walker
from convfirst_jax.analysis.cli import build_model, main
from convfirst_jax.analysis.measure import measure_blocks, model_groups
from convfirst_jax.analysis import plots


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def _abstract_conv(cin, cout, k, groups, padding="VALID", bias=True):
  return nnx.eval_shape(lambda: nnx.Conv(cin, cout, (k, k), padding=padding,
                                         feature_group_count=groups, use_bias=bias,
                                         rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------- layer counts

@pytest.mark.parametrize("kind,cin,cout,k,groups", [
    ("dwconv", 16, 16, 3, 16),     # depthwise: one input channel per output channel
    ("gconv", 32, 32, 3, 4),       # group width 8
    ("conv", 4, 24, 2, 1),
])
def test_conv_counts_by_hand_and_against_xla(kind, cin, cout, k, groups):
  n, h, w = 2, 9, 11
  conv = _abstract_conv(cin, cout, k, groups, bias=False)
  walker = _Walker(n)
  walker.conv("c", "b", conv, (n, h, w, cin))
  (l,) = walker.layers
  ho, wo = h - k + 1, w - k + 1
  cin_g = cin // groups
  assert l.kind == kind
  assert l.out_shape == (n, ho, wo, cout)
  assert l.params == k * k * cin_g * cout
  assert l.macs == n * ho * wo * cout * k * k * cin_g
  assert l.flops == 2 * l.macs
  assert l.min_bytes(2) == 2 * (n * h * w * cin + n * ho * wo * cout + k * k * cin_g * cout)
  assert l.min_bytes(4) == 2 * l.min_bytes(2)
  x = jnp.zeros((n, h, w, cin), jnp.float32)
  kern = jnp.zeros((k, k, cin_g, cout), jnp.float32)
  conv_fn = lambda x, kern: jax.lax.conv_general_dilated(
      x, kern, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)
  assert _xla_flops(conv_fn, x, kern) == l.flops   # XLA: a multiply-add is 2 FLOPs


def test_conv_bias_adds_one_flop_per_output():
  conv = _abstract_conv(16, 16, 3, 16, bias=True)
  walker = _Walker(1)
  walker.conv("c", "b", conv, (1, 8, 8, 16))
  (l,) = walker.layers
  assert l.params == 9 * 16 + 16
  assert l.flops == 2 * 6 * 6 * 16 * 9 + 6 * 6 * 16


def test_dense_counts_by_hand_and_against_xla():
  walker = _Walker(3)
  walker.dense("fc", "b", 24, 40, True, (3, 5, 7, 24))
  (l,) = walker.layers
  pixels = 3 * 5 * 7
  assert l.params == 24 * 40 + 40
  assert l.macs == pixels * 24 * 40
  assert l.flops == 2 * pixels * 24 * 40 + pixels * 40        # + bias
  assert l.min_bytes(2) == 2 * (pixels * 24 + pixels * 40 + 24 * 40 + 40)
  x = jnp.zeros((3, 5, 7, 24))
  kern = jnp.zeros((24, 40))
  assert _xla_flops(lambda x, k: x @ k, x, kern) == 2 * l.macs


def test_layernorm_counts_by_hand_and_bounded_by_xla():
  walker = _Walker(2)
  walker.norm("ln", "b", "layernorm", (2, 4, 4, 32), 64)
  (l,) = walker.layers
  elems = 2 * 4 * 4 * 32
  assert (l.params, l.macs, l.flops) == (64, 0, 8 * elems)
  assert l.min_bytes(2) == 2 * (2 * elems + 64)
  assert l.intensity(2) == pytest.approx(8 * elems / (2 * (2 * elems + 64)))
  ln = nnx.LayerNorm(32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(ln)
  xla = _xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((2, 4, 4, 32)))
  # XLA's element-wise convention differs from ours (8 / element), but not wildly.
  assert 4 * elems <= xla <= 16 * elems


def test_convnext_tiny_numbers_unchanged():
  w = analyze(build_model("convnext_tiny"), 224, 1, DEVICES["h100"])
  assert w.params == 28_589_128
  assert round(w.macs / 1e9, 3) == 4.456


# --------------------------------------------------------------------------- waterline

def test_kernel_floor_is_max_of_compute_and_memory():
  dev = Device("toy", {"bfloat16": 100e12}, 1e12, "test")
  memory_bound = kernel_floor("a", "x", 1e9, 1e8, dev)      # 10 us compute, 100 us memory
  assert memory_bound.time_s == pytest.approx(100e-6) and memory_bound.bound == "memory"
  assert memory_bound.intensity == pytest.approx(10.0)
  compute_bound = kernel_floor("b", "x", 1e12, 1e8, dev)
  assert compute_bound.time_s == pytest.approx(10e-3) and compute_bound.bound == "compute"


def test_waterline_sums_over_kernels_of_each_partition():
  w = analyze(build_model("convnext_atto"), 64, 4, DEVICES["a100"])
  dev = DEVICES["a100"]
  fused = sum(max(b.count.flops / dev.peak("bfloat16"), b.count.min_bytes(2) / dev.dram_bandwidth)
              for b in w.blocks)
  unfused = sum(max(l.flops / dev.peak("bfloat16"), l.min_bytes(2) / dev.dram_bandwidth)
                for l in layer_counts(build_model("convnext_atto"), 64, 4))
  assert w.fused_s == pytest.approx(fused)
  assert w.unfused_s == pytest.approx(unfused)
  assert [b.name for b in w.blocks] == [b.name for b in block_counts(
      layer_counts(build_model("convnext_atto"), 64, 4))]
  assert {b.kind for b in w.blocks} == {"stem", "downsample", "convnext", "head"}


@pytest.mark.parametrize("name,training_form",
                         [(n, False) for n in cj.list_models()]
                         + [(n, True) for n in cj.list_models("convfirst_*")])
def test_fused_bytes_never_exceed_unfused(name, training_form):
  model = build_model(name, training_form=training_form)
  w = analyze(model, 224, 8, DEVICES["h100"])
  for b in w.blocks:
    assert b.fused.min_bytes <= b.unfused_bytes, b.name
    assert b.fused.time_s <= b.unfused_s * (1 + 1e-12), b.name
  assert w.fused_bytes <= w.unfused_bytes and w.fused_s <= w.unfused_s
  kinds = {b.kind for b in w.blocks}
  assert kinds & {"convnext", "convfirst", "mbconv"}


def test_floors_match_design_md_baselines():
  # The design notes' H100 table (batch 128, bf16, 680 TFLOP/s, 2.0 TB/s).  Its floors count
  # only the convs' and matmuls' FLOPs; ours add element-wise work (a few %).
  dev = get_device("h100-measured")
  expect = {("convnext_tiny", "stages.0.blocks.0"): 0.093,
            ("convnext_tiny", "stages.3.blocks.0"): 0.088,
            ("convfirst_nano", "stages.0.blocks.0"): 0.051,   # 56x56x64, memory bound
            ("convfirst_nano", "stages.2.blocks.0"): 0.044}   # MBConv 14x14x256
  for (model, block), ms in expect.items():
    w = analyze(build_model(model), 224, 128, dev)
    b = next(b for b in w.blocks if b.name == block)
    assert b.fused.time_s * 1e3 == pytest.approx(ms, rel=0.05), (model, block)


def test_device_table():
  for key in ("h100", "h200", "a100", "l4", "rtx4090"):
    d = get_device(key)
    assert 50e12 < d.peak("bfloat16") < 2000e12 and 100e9 < d.dram_bandwidth < 10e12
    assert d.source
  assert get_device("H100").dram_bandwidth == 3.35e12
  with pytest.raises(ValueError, match="unknown device"):
    get_device("tpu")


def test_measure_ceilings_small_on_cpu():
  d = measure_ceilings(matmul_size=128, copy_bytes=1 << 20, dtype="float32", iters=3)
  assert d.peak("float32") > 0 and d.dram_bandwidth > 0


# --------------------------------------------------------------------------- measuring

def test_groups_follow_block_counts_and_identical_blocks_are_timed_once():
  model = build_model("convnext_atto", num_classes=10, dtype="float32", abstract=False)
  w = analyze(model, 32, 2)
  assert [g.name for g in model_groups(model)] == [b.name for b in w.blocks]
  times = measure_blocks(model, {b.name: b.count.in_shape for b in w.blocks}, jnp.float32,
                         impls=("xla",), warmup=0, iters=2, progress=False)
  assert set(times) == {b.name for b in w.blocks}
  a, b = times["stages.2.blocks.0"]["xla"], times["stages.2.blocks.5"]["xla"]
  assert a is b and a.seconds > 0
  assert times["stem"]["xla"] is not times["stages.1.downsample"]["xla"]


# --------------------------------------------------------------------------- plots

def test_plots_have_titles_labels_and_size(tmp_path):
  w = analyze(build_model("convfirst_atto"), 64, 2, DEVICES["h100"], name="convfirst_atto")
  gap = plots.efficiency_gap_figure(w)
  ax = gap.axes[0]
  assert "efficiency gap" in ax.get_title() and "convfirst_atto" in ax.get_title()
  assert "analytic floors only" in ax.get_title()
  assert ax.get_ylabel() == plots.GAP_YLABEL and ax.get_xlabel() == plots.GAP_XLABEL
  assert len(ax.get_xticklabels()) == len(w.blocks)
  roof = plots.roofline_figure(w)
  rax = roof.axes[0]
  assert "roofline" in rax.get_title()
  assert rax.get_xlabel() == plots.ROOF_XLABEL and rax.get_ylabel() == plots.ROOF_YLABEL
  assert rax.get_xscale() == "log" and rax.get_yscale() == "log"
  paths = plots.save_plots(w, str(tmp_path / "atto.png"), dpi=50)
  assert paths == [str(tmp_path / "atto.png"), str(tmp_path / "atto_roofline.png")]
  for path, fig in zip(paths, (gap, roof)):
    img = matplotlib.image.imread(path)
    width, height = fig.get_size_inches() * 50
    assert img.shape[:2] == (round(height), round(width))


# --------------------------------------------------------------------------- command line

def test_cli_analytic(tmp_path, capsys):
  out = tmp_path / "r.json"
  assert main(["--model", "convfirst_atto", "--batch", "4", "--image-size", "64",
               "--device", "l4", "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
  text = capsys.readouterr().out
  assert "folded inference form" in text and "NVIDIA L4" in text
  assert "waterline: fused" in text and "stages.0.blocks.0" in text
  r = json.loads(out.read_text())
  assert r["model"] == "convfirst_atto" and r["batch"] == 4
  assert r["fused_s"] == pytest.approx(sum(b["fused"]["time_s"] for b in r["blocks"]))
  assert "measured_s" not in r["blocks"][0]
  assert (tmp_path / "p.png").exists() and (tmp_path / "p_roofline.png").exists()


def test_cli_measure_needs_gpu_or_allow_cpu(capsys):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  assert main(["--model", "convnext_atto", "--batch", "2", "--image-size", "32",
               "--measure"]) == 2
  captured = capsys.readouterr()
  assert "need a GPU" in captured.err and "waterline: fused" in captured.out
  assert main(["--model", "nope"]) == 2


def test_cli_measure_on_cpu(tmp_path, capsys):
  out = tmp_path / "m.json"
  assert main(["--model", "convfirst_atto", "--batch", "2", "--image-size", "32",
               "--measure", "--allow-cpu", "--iters", "2", "--warmup", "0", "--no-progress",
               "--json", str(out), "--plot", str(tmp_path / "m.png")]) == 0
  text = capsys.readouterr().out
  assert "XLA us" in text and "whole model forward, XLA" in text
  r = json.loads(out.read_text())
  for b in r["blocks"]:
    assert b["measured_s"]["xla"] > 0
    assert b["efficiency"]["xla"] > 0
    if b["kind"] in ("convfirst", "mbconv"):
      p = b["measured_s"]["pallas"]       # n/a (None) until the kernels exist
      assert p is None or p > 0
  assert r["model_measured_s"]["xla"] > 0
