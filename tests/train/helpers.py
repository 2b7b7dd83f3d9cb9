"""Shared settings for the training tests: tiny models, short runs."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}

# One short run with two checkpoints (steps 5 and 10).  The tests that only need *some*
# finished run (overwriting, changed settings, corrupt checkpoints) all train this one, so
# that with the compilation cache of conftest.py the train and eval steps compile once per
# pytest worker instead of once per test: a different `steps` is a different learning-rate
# schedule, i.e. another program to compile (~15 s on a 2-core CPU).
CHECKPOINTED_RUN = dict(steps=10, save_every=5, eval_every=10, keep=3, plot=False)


def tiny_config(tmp_path, **overrides):
  from train import TrainConfig
  kw = dict(model="convnext_atto", model_kwargs=dict(TINY), dataset="digits", image_size=32,
            batch_size=32, steps=30, lr=3e-3, output_dir=str(tmp_path / "run"),
            log_every=5, eval_every=15, progress=False, async_checkpointing=False)
  kw.update(overrides)
  return TrainConfig(**kw)


def subprocess_env(env=None, *, compile_cache=None):
  """Environment of a ``python`` the tests start: the package importable, CPU unless the
  caller's environment says otherwise, then ``env``; with ``compile_cache`` (a directory)
  jax's persistent compilation cache there for every program, so that processes running
  the same programs compile them once between them."""
  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  if compile_cache is not None:
    full_env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  full_env.update(env or {})
  return full_env


def run_python(args, *, env=None, timeout=300, **kw):
  """Runs ``python args...`` in the repo root with the package importable."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(env),
                        timeout=timeout, capture_output=True, text=True, **kw)
