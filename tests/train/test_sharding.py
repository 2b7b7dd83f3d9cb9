"""Data-parallel training over 4 (forced) CPU devices equals single-device training."""

import json

import numpy as np

from tests.train.helpers import run_python

LR, STEPS = 3e-3, 8  # as in sharded_check.py


def test_four_devices_match_one_device():
  # Compiled at LLVM optimisation level 0, as the rest of the suite (tests/conftest.py):
  # the check is compile-bound (the test alone on a 2-core CPU: ~70-86 s -> ~45-48 s).
  # The measurements quoted below were taken at XLA's default level; at level 0 the same
  # comparisons stayed well inside the same bounds: largest parameter difference after
  # the 8 steps 9.6e-5 (default level 1.27e-4) against 2e-4, largest one-gradient
  # difference 2.7e-6 (default level 1.9e-6) against 1e-5.
  r = run_python(["-m", "tests.train.sharded_check"],
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                                   "--xla_backend_optimization_level=0"}, timeout=400)
  assert r.returncode == 0, r.stderr[-4000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))
  report = json.loads(line[len("RESULT "):])
  # One gradient: the same math, only the order of the cross-device sums (gradients,
  # batch statistics) differs -- float32 rounding (measured <= 1.5e-6 relative, before
  # and after the BatchNorm kernels of 2026-11-27).  Statistics computed per device
  # instead of over the whole batch would show here at ~1e-2.
  assert set(report["gradients"]) == {"convfirst_atto", "convnext_atto"}
  for model, rels in report["gradients"].items():
    for name, rel in rels.items():
      assert rel <= 1e-5, (model, name, rel)
  # The whole loop (8 steps of fit) on ConvFirstNet, the model with batch statistics.
  for model in ("convfirst_atto",):
    res = report[model]
    assert res["n_devices_used"] == 4
    one, four = res["losses"]
    np.testing.assert_allclose(four, one, rtol=1e-5)
    assert res["val_acc"][0] == res["val_acc"][1]
    for name, (diff, magnitude) in res["diffs"].items():
      # After 8 Adam steps.  Adam divides each gradient by its own running RMS, so an
      # element whose gradient is small relative to its rounding moves by rounding noise
      # times up to lr per step: 2e-4 is 120x below the lr * steps a real difference in
      # the computation would show (ConvNeXt, without BatchNorm, stayed below 1e-5 while
      # its fit pair ran here).  The largest ConvFirstNet difference was 8.7e-5 until
      # 2026-11-27 and 1.27e-4 after its BatchNorms got hand-written backward passes, whose
      # one-step gradients agree across devices as closely as before (checked above).
      tol = 2e-4 * max(1.0, magnitude)
      leaf = name.removesuffix(".value")  # nnx.State paths end in .value, plain dicts not
      if model == "convfirst_atto" and "bn" in name and (
          leaf.endswith("['bias']") or leaf.endswith("['mean']")):
        # BatchNorm shifts whose output feeds (through convs) another BatchNorm have a true
        # gradient of ~0 (BN removes per-channel constants), so their gradient is pure
        # rounding noise, which Adam turns into steps of up to lr; the running means of the
        # BatchNorms after them record those shifts (the normalisation removes them, hence
        # the equal losses).  Bounded by the steps taken, not by rounding.
        tol = 2 * LR * STEPS
      assert diff <= tol, (model, name, diff)
  err = report["bad_batch_error"]
  assert err is not None and "30" in err and "devices (4)" in err
