"""benchmarks.models on two (forced) CPU devices: the data-parallel option runs and writes
its rows; a batch the devices do not divide is refused by name."""

import json

from tests.train.helpers import run_python

ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                    "--xla_backend_optimization_level=0"}


def test_two_devices(tmp_path):
  out = tmp_path / "rows.json"
  r = run_python(["-m", "benchmarks.models", "--models", "convnext_atto", "--batches", "2",
                  "--impls", "xla", "--image-size", "32", "--iters", "1", "--num-devices",
                  "2", "--json", str(out)], env=ENV, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  (row,) = json.loads(out.read_text())
  assert row["device"].endswith(" x2") and row["images_per_s"] > 0
  r = run_python(["-m", "benchmarks.models", "--batches", "3", "--num-devices", "2"],
                 env=ENV, timeout=300)
  assert r.returncode == 2 and "--batches 3 not a multiple of --num-devices 2" in r.stderr
