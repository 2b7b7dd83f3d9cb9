"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag
must be set before jax starts): trains the same tiny model on 1 and on 4 CPU devices and
prints the largest parameter difference as JSON."""

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from train import TrainConfig, fit

TINY = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


def run(out, num_devices, model, batch_size=32, **kw):
  cfg = TrainConfig(model=model, model_kwargs=TINY, dataset="digits", batch_size=batch_size,
                    steps=8, lr=3e-3, output_dir=str(out), num_devices=num_devices,
                    log_every=4, eval_every=8, progress=False, plot=False,
                    async_checkpointing=False, **kw)
  return fit(cfg, quiet=True)


def main():
  assert jax.device_count() == 4, jax.devices()
  with tempfile.TemporaryDirectory() as d:  # the runs' checkpoints and metrics go with it
    report = _compare(Path(d))
  print("RESULT " + json.dumps(report))


def _compare(tmp):
  report = {}
  for model in ("convfirst_atto", "convnext_atto"):
    one = run(tmp / f"{model}1", 1, model, drop_path=0.1)
    four = run(tmp / f"{model}4", 4, model, drop_path=0.1)
    tree1 = {"params": one.state["params"], "batch_stats": one.state["batch_stats"]}
    tree4 = {"params": four.state["params"], "batch_stats": four.state["batch_stats"]}
    diffs = {jax.tree_util.keystr(k): (float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                       float(np.max(np.abs(np.asarray(a)))))
             for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(tree1),
                                  jax.tree.leaves(tree4))}
    losses = [[r["loss"] for r in res.records if r["kind"] == "train"] for res in (one, four)]
    report[model] = {"diffs": diffs, "losses": losses,
                     "n_devices_used": len(jax.tree.leaves(tree4)[0].sharding.device_set),
                     "val_acc": [one.summary["final_val_acc"], four.summary["final_val_acc"]]}
  try:
    run(tmp / "bad", 4, "convnext_atto", batch_size=30)
    report["bad_batch_error"] = None
  except ValueError as e:
    report["bad_batch_error"] = str(e)
  return report


if __name__ == "__main__":
  sys.exit(main())
