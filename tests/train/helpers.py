"""Shared settings for the training tests: tiny models, short runs."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


def tiny_config(tmp_path, **overrides):
  from train import TrainConfig
  kw = dict(model="convnext_atto", model_kwargs=dict(TINY), dataset="digits", image_size=32,
            batch_size=32, steps=30, lr=3e-3, output_dir=str(tmp_path / "run"),
            log_every=5, eval_every=15, progress=False, async_checkpointing=False)
  kw.update(overrides)
  return TrainConfig(**kw)


def run_python(args, *, env=None, timeout=300, **kw):
  """Runs ``python args...`` in the repo root with the package importable."""
  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  full_env.update(env or {})
  return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, timeout=timeout,
                        capture_output=True, text=True, **kw)
