"""Exact resume after a real kill, and corrupt / truncated checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.helpers import CHECKPOINTED_RUN, REPO, TINY, subprocess_env, tiny_config
from train import CheckpointError, fit
from train.metrics import read_metrics

# The killed run is stopped once it has logged step 12 (past the checkpoints at 5 and 10
# and the evaluation at 10) and resumed from 10, through two more checkpoints and an
# evaluation, to step 20.  At the kill it still has 8 steps to go (~1.5 s on a 2-core CPU)
# against a poll every 20 ms below.  (STEPS was 30: 10 more steps in each of two runs.)
STEPS = 20
KILL_AFTER = 12


def _train_cmd(out, *extra):
  # A tiny ConvFirstNet: BatchNorm statistics, stochastic depth (RNG state) and an EMA all
  # have to come back from the checkpoint for the resumed run to match.
  return [sys.executable, "-m", "train", "--model", "convfirst_atto", "--model-kwargs",
          json.dumps(TINY), "--drop-path", "0.1", "--ema-decay", "0.9", "--batch-size", "32",
          "--steps", str(STEPS), "--save-every", "5", "--eval-every", "10", "--log-every", "1",
          "--keep", "3", "--no-plot", "--no-progress", "--output-dir", str(out), *extra]


def _env(compile_cache):
  return subprocess_env({"JAX_PLATFORMS": "cpu"}, compile_cache=compile_cache)


def _final_state(out):
  path = out / "checkpoints" / str(STEPS) / "state"
  return ocp.StandardCheckpointer().restore(path)


def _flat(tree):
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_kill_and_resume_is_bitwise_exact(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  # The three processes run the same programs and share one persistent compilation cache:
  # the uninterrupted reference run compiles them, the killed and the resumed run load them
  # (which only saves time: a loaded executable is the program that was compiled).  The
  # reference runs first and to the end, so that no process reads an entry while another
  # one is still writing it.
  env = _env(tmp_path / "jax_cache")
  ref = subprocess.run(_train_cmd(full), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  proc = subprocess.Popen(_train_cmd(killed), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = killed / "metrics.jsonl"
  deadline = time.time() + 600  # generous: CI runs tests in parallel
  seen = 0
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists():
      steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
      seen = max(steps, default=0)
      if seen >= KILL_AFTER:
        break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  last_logged = max(r["step"] for r in read_metrics(metrics) if r["kind"] == "train")
  assert KILL_AFTER <= last_logged < STEPS
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < STEPS

  resumed = subprocess.run(_train_cmd(killed, "--resume"), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed at step" in resumed.stdout

  a, b = _flat(_final_state(full)), _flat(_final_state(killed))
  assert a.keys() == b.keys()
  assert any("ema" in k for k in a) and any("mean" in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The metrics file reads as one run: every step once, in order.
  steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
  assert steps == list(range(1, STEPS + 1))
  full_losses = [r["loss"] for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "train"]
  killed_losses = [r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"]
  assert full_losses == killed_losses


def _corrupt(step_dir):
  """Truncates every array data file of a finished checkpoint to half its size."""
  files = [p for p in (step_dir / "state").rglob("*")
           if p.is_file() and p.parent.name == "d" and p.stat().st_size > 0]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _snapshot(d):
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
  # CHECKPOINTED_RUN: steps=10 with checkpoints at 5 and 10.  The resumed runs keep its
  # settings (the same program: conftest.py's compilation cache has it) and train steps
  # 6..10 again from checkpoint 5.
  cfg = tiny_config(tmp_path, **CHECKPOINTED_RUN)
  fit(cfg, quiet=True)
  ckpts = tmp_path / "run" / "checkpoints"
  _corrupt(ckpts / "10")
  before = _snapshot(ckpts)
  with pytest.raises(CheckpointError) as err:
    fit(tiny_config(tmp_path, **CHECKPOINTED_RUN, resume=True), quiet=True)
  msg = str(err.value)
  assert str(ckpts / "10") in msg and "--resume-step 5" in msg
  assert _snapshot(ckpts) == before  # nothing written, nothing deleted

  # The earlier checkpoint still works; the corrupt one is moved aside, not deleted.
  result = fit(tiny_config(tmp_path, **CHECKPOINTED_RUN, resume_step=5), quiet=True)
  assert result.summary["step"] == 10
  aside = list((tmp_path / "run" / "checkpoints.superseded").glob("*/10"))
  assert len(aside) == 1


def test_resume_without_checkpoint_is_an_error(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    fit(tiny_config(tmp_path, resume=True), quiet=True)
