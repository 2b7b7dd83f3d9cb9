"""Pallas kernels under a sharded batch (pallas_kernels._sharding): each device runs the
kernels on its own images inside a shard_map, with the same results (and summed weight
gradients) as one device on the whole batch."""

from __future__ import annotations

import json
import types

import jax
import pytest

from pallas_kernels import _sharding
from tests.train.helpers import run_python

AUTO, MANUAL = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Manual


def _report(args, env):
  r = run_python(["-m", "tests.pallas_kernels.sharded_kernels_check", *args], env=env,
                 timeout=400)
  assert r.returncode == 0, r.stderr[-4000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


def _check(report, tol_f32, tol_bf16, every_case_runs):
  assert set(report) == {"layer_norm", "convnext_block", "grouped_conv", "convfirst_block",
                         "mbconv_stage", "convfirst_stage", "convfirst_block_train",
                         "batch_norm_act", "mbconv_block_train", "predictor"}
  pred = report.pop("predictor")  # convfirst_jax.predictor(model, mesh) vs one device
  assert pred["out_sharding"] == "P('data',)"
  assert pred["max_rel"] < (tol_f32 if tol_bf16 is None else tol_bf16)
  assert "multiple of the mesh's 2 devices" in pred["odd_batch_error"]
  for name, res in report.items():
    assert res["shard_map_with_mesh"], name  # the kernels were wrapped ...
    assert not res["shard_map_without_mesh"], name  # ... only where a mesh is set
    assert not res["shard_map_when_off"], name
    if every_case_runs:
      assert res["ran"], name
    if res["ran"]:
      assert res["out_sharding"] == "P('data',)", name
      tol = tol_f32 if res["dtype"] == "float32" else tol_bf16
      assert res["max_rel"] < tol, (name, res["max_rel"])


def test_two_cpu_devices_match_one():
  # The same kernels on half the batch each; only the cross-device sum of the weight
  # gradients is ordered differently (measured <= 3e-7 on these shapes).
  report = _report([], {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                     "--xla_backend_optimization_level=0"})
  _check(report, 1e-5, None, every_case_runs=False)
  assert sum(r["ran"] for r in report.values()) == 6  # the Mosaic GPU cases: traced only


@pytest.mark.gpu
def test_two_gpus_match_one():
  if len(jax.devices()) < 2:
    pytest.skip("needs two GPUs")
  report = _report(["--gpu"], {"JAX_PLATFORMS": ""})
  # bfloat16 cases: the BatchNorm statistics are summed across devices in another order,
  # which can move a bfloat16 output by one rounding step.
  _check(report, 1e-5, 5e-3, every_case_runs=True)


def _fake_mesh(monkeypatch, names, sizes, types_):
  mesh = types.SimpleNamespace(empty=not names, axis_names=names, axis_sizes=sizes,
                               axis_types=types_)
  monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: mesh)


def test_batch_axes(monkeypatch):
  _fake_mesh(monkeypatch, (), (), ())
  assert _sharding.batch_axes(8) == ()
  _fake_mesh(monkeypatch, ("data",), (1,), (AUTO,))
  assert _sharding.batch_axes(8) == ()
  _fake_mesh(monkeypatch, ("data", "model"), (2, 4), (AUTO, AUTO))
  assert _sharding.batch_axes(8) == ("data", "model")
  assert _sharding.batch_axes(6) == ("data",)  # 6 is not a multiple of 8
  assert _sharding.batch_axes(3) == ()
  _fake_mesh(monkeypatch, ("data", "model"), (2, 4), (MANUAL, AUTO))
  assert _sharding.batch_axes(8) == ("model",)  # already inside a shard_map over data
  with _sharding.batch_sharding(False):
    assert _sharding.batch_axes(8) == ()
  assert _sharding.batch_axes(8) == ("model",)


def test_map_batch_without_mesh_is_a_plain_call(monkeypatch):
  _fake_mesh(monkeypatch, (), (), ())
  calls = []
  out = _sharding.map_batch(lambda a, b: calls.append((a, b)) or a + b, (1,), (2,), batch=4)
  assert out == 3 and calls == [(1, 2)]


def test_size_thresholds_apply_per_device(monkeypatch):
  """implementation=None's minimum sizes, measured per kernel call on one GPU, compare the
  rows each device's call sees: 8 images of 24x24 (4,608 px) are Pallas-sized for
  LayerNorm (>= 4,096 rows) on one device, not split over 2 (2,304 each)."""
  from pallas_kernels import layernorm
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  _fake_mesh(monkeypatch, (), (), ())
  assert _sharding.local_batch(8) == 8
  assert layernorm.picks_pallas((8, 24, 24, 32), jax.numpy.bfloat16)
  _fake_mesh(monkeypatch, ("data",), (2,), (AUTO,))
  assert _sharding.local_batch(8) == 4
  assert not layernorm.picks_pallas((8, 24, 24, 32), jax.numpy.bfloat16)
  assert layernorm.picks_pallas((16, 24, 24, 32), jax.numpy.bfloat16)
