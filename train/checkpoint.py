"""Orbax checkpoints of the whole TrainState (model, optimizer, EMA, step, RNG streams).

One CheckpointManager keeps the newest ``keep`` checkpoints plus the one with the best
validation accuracy.  Orbax writes each step into a temporary folder and renames it when
complete, so an interrupted save never replaces a finished checkpoint; a checkpoint that
is complete on disk but unreadable (truncated or corrupt files) raises CheckpointError
naming its folder instead of silently starting over.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored, or a run that would overwrite checkpoints."""


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state):
  """Typed PRNG keys (the models' dropout streams) -> their raw uint32 data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def from_saveable(restored, template):
  return jax.tree.map(
      lambda r, t: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key(t) else r,
      restored, template)


def _abstract(tree):
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Saves and restores TrainStates under ``directory`` (one sub-folder per step)."""

  def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=lambda m: m["val_acc"], n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state, meta: dict, val_acc: float | None = None) -> None:
    """Starts an (asynchronous) save; ``val_acc`` ranks it for the best-checkpoint slot."""
    metrics = None if val_acc is None else {"val_acc": float(val_acc)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(to_saveable(state)), meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def restore(self, template, step: int | None = None):
    """(state, meta) of ``step`` (default: newest), shaped and sharded like ``template``."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; "
                            f"available: {steps}")
    path = self.directory / str(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(to_saveable(template))),
          meta=ocp.args.JsonRestore()))
      state = from_saveable(restored.state, template)
      meta = dict(restored.meta)
    except Exception as e:
      earlier = [s for s in steps if s < step]
      hint = (f"resume from an earlier one with --resume-step {earlier[-1]} "
              f"(available: {earlier})" if earlier else "no earlier checkpoint exists")
      raise CheckpointError(
          f"checkpoint {path} (step {step}) could not be read; its files may be truncated "
          f"or corrupt, or it holds another model's state or the nnx.State layout of "
          f"checkpoints written before 2026-11-25 (TrainStates are plain dicts since): "
          f"{type(e).__name__}: {str(e)[:500]}\nNothing was overwritten; "
          f"{hint}, or move the folder away.") from e
    return state, meta

  def set_aside_after(self, step: int) -> list[Path]:
    """Moves checkpoints newer than ``step`` to ``<dir>.superseded/<time>/`` (a resume from
    an earlier step replaces that future; the old files are kept, not deleted)."""
    newer = [s for s in self.steps() if s > step]
    if not newer or jax.process_index() != 0:
      return []
    dest = self.directory.with_name(self.directory.name + ".superseded") / time.strftime(
        "%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for s in newer:
      shutil.move(str(self.directory / str(s)), str(dest / str(s)))
      moved.append(dest / str(s))
    self.manager.reload()
    return moved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
