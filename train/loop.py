"""``fit(config)``: the training loop behind ``python -m train``."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from train import data as data_lib
from train import engine, parallel
from train.checkpoint import Checkpointer, CheckpointError
from train.config import DEFAULT_STEPS, RESUME_INVARIANT_FIELDS, TrainConfig
from train.metrics import METRICS_FILE, PLOT_FILE, MetricsLog, Progress, Timer, format_seconds, plot_curves

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns: the final TrainState (device arrays), the model with the final
  weights (eval mode; ``ema_model`` with the EMA weights if kept), every metric record
  and the summary."""
  state: dict
  model: Any
  ema_model: Any
  records: list[dict]
  summary: dict
  output_dir: Path


def _schedule_lengths(cfg: TrainConfig, spe: int) -> tuple[int, int]:
  """(total steps, warm-up steps) for ``spe`` steps per epoch: ``cfg.steps``, else
  ``cfg.epochs`` epochs, else ``DEFAULT_STEPS``."""
  if cfg.steps is not None:
    total = cfg.steps
  elif cfg.epochs is not None:
    total = max(1, math.ceil(cfg.epochs * spe))
  else:
    total = DEFAULT_STEPS
  if cfg.warmup_steps is not None:
    warmup = cfg.warmup_steps
  elif cfg.warmup_epochs is not None:
    warmup = int(round(cfg.warmup_epochs * spe))
  else:
    warmup = int(round(0.05 * total))
  return total, min(warmup, max(total - 1, 0))


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
  path = out / CONFIG_FILE
  if not path.exists():
    return
  old = json.loads(path.read_text())
  diff = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_INVARIANT_FIELDS
          if k in old and old[k] != getattr(cfg, k)]
  if diff:
    raise CheckpointError(
        f"--resume with settings that differ from the run in {out} ({'; '.join(diff)}); "
        "resume with the same settings, or train into a new --output-dir")


def fit(config: TrainConfig, *, quiet: bool = False) -> FitResult:
  """Trains ``config.model`` on ``config.dataset``; see TrainConfig for every option.

  Writes config.json, metrics.jsonl, curves.png and checkpoints/ under
  ``config.output_dir``.  With ``resume=True`` it continues from the newest (or
  ``resume_step``) checkpoint there and, on CPU, ends with the same parameters bit for
  bit as an uninterrupted run.
  """
  cfg = dataclasses.replace(config).validate()
  wall = Timer()
  parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh(parallel.first_devices(cfg.num_devices))
  parallel.check_batch_size(cfg.batch_size, mesh)

  out = Path(cfg.output_dir)
  ckpt_dir = out / CHECKPOINT_DIR
  resuming = cfg.resume or cfg.resume_step is not None
  if is_main:
    out.mkdir(parents=True, exist_ok=True)
  if not resuming and ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise CheckpointError(
        f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run, or "
        "choose another --output-dir (nothing was overwritten)")
  if resuming:
    _check_resume_config(out, cfg)

  dataset = data_lib.make_dataset(
      cfg.dataset, cfg.image_size, workers=cfg.workers, augment=cfg.augment,
      skip_corrupt=cfg.skip_corrupt, synthetic_size=cfg.synthetic_size,
      num_classes=cfg.num_classes)
  spe = data_lib.steps_per_epoch(dataset.num_train, cfg.batch_size)
  total_steps, warmup = _schedule_lengths(cfg, spe)
  eval_every = cfg.eval_every or spe
  save_every = cfg.save_every or eval_every

  model = engine.build_model(cfg.model, dataset.num_classes, block_impl=cfg.block_impl,
                             dtype=cfg.dtype, drop_path=cfg.drop_path, seed=cfg.seed,
                             in_chans=dataset.channels, **cfg.model_kwargs)
  split = engine.SplitModel.from_model(model)
  tx, schedule = engine.make_optimizer(
      split.params, lr=cfg.lr, total_steps=total_steps, warmup_steps=warmup,
      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, min_lr=cfg.min_lr)
  state = engine.init_state(split, tx, ema=cfg.ema_decay is not None)
  repl = parallel.replicated(mesh)
  state = jax.device_put(state, repl)
  # Between steps the state lives packed (a few flat buffers instead of hundreds of arrays:
  # see engine.StatePacker); checkpoints and the returned state are the nested form.
  packer = engine.StatePacker(state)
  pack = jax.jit(packer.pack, out_shardings=repl)
  unpack = jax.jit(packer.unpack, out_shardings=repl)

  checkpointer = Checkpointer(ckpt_dir, keep=cfg.keep, async_save=cfg.async_checkpointing)
  start_step, best = 0, {"val_acc": -1.0, "step": None}
  elapsed_before = 0.0
  if resuming:
    if cfg.resume_step is None and not checkpointer.steps():
      raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir} to resume from")
    state, meta = checkpointer.restore(state, cfg.resume_step)
    start_step = int(meta["step"])
    best = meta.get("best", best)
    elapsed_before = float(meta.get("elapsed_s", 0.0))
    checkpointer.set_aside_after(start_step)
  packed = pack(state)
  del state
  if is_main:
    (out / CONFIG_FILE).write_text(cfg.to_json())
  log = MetricsLog(out / METRICS_FILE, enabled=is_main,
                   resume_step=start_step if resuming else None)
  progress = Progress(total_steps, start_step, enabled=cfg.progress and is_main,
                      quiet=quiet or not is_main)
  progress.message(
      f"{cfg.model} ({sum(x.size for x in jax.tree.leaves(split.params)):,} params, "
      f"{cfg.dtype}) on {dataset.describe()}; {total_steps} steps of {cfg.batch_size} "
      f"({spe} steps/epoch) on {mesh.size} {jax.default_backend()} device(s)"
      + (f"; resumed at step {start_step}" if resuming else ""))
  if dataset.skipped_files:
    progress.message(f"skipped {len(dataset.skipped_files)} unreadable image file(s), e.g. "
                     + ", ".join(dataset.skipped_files[:5]))

  state_sharding = jax.tree.map(lambda _: repl, packed)
  batch_sh = parallel.batch_sharding(mesh)
  train_step = parallel.jit_in_mesh(
      engine.make_packed_train_step(packer, split, tx, num_classes=dataset.num_classes,
                                    label_smoothing=cfg.label_smoothing,
                                    ema_decay=cfg.ema_decay, mean=dataset.mean,
                                    std=dataset.std), mesh,
      donate_argnums=0, in_shardings=(state_sharding, batch_sh, batch_sh),
      out_shardings=(state_sharding, repl))
  eval_steps = {prefix: parallel.jit_in_mesh(engine.make_packed_eval_step(
      packer, split, ema=bool(prefix), num_classes=dataset.num_classes, mean=dataset.mean,
      std=dataset.std), mesh, out_shardings=repl)
      for prefix in ("",) + (("ema_",) if cfg.ema_decay is not None else ())}

  def evaluate(step: int) -> dict:
    sums = {prefix: None for prefix in eval_steps}
    for batch in dataset.val_batches(cfg.batch_size, jax.process_index(), jax.process_count()):
      images, labels, mask = parallel.put_local_batch(
          (batch.images, batch.labels, batch.mask), mesh)
      for prefix, eval_step in eval_steps.items():
        s = eval_step(packed, images, labels, mask)
        sums[prefix] = s if sums[prefix] is None else sums[prefix] + s
    rec = {"kind": "val", "step": step, "epoch": round(step / spe, 3)}
    for prefix, s in sums.items():
      if s is not None:
        loss, correct, count = (float(v) for v in jax.device_get(s))
        rec[prefix + "loss"], rec[prefix + "acc"] = loss / count, correct / count
    return rec

  def meta(step: int) -> dict:
    return {"step": step, "best": best, "elapsed_s": elapsed_before + wall(),
            "config": dataclasses.asdict(cfg)}

  batches = data_lib.Prefetcher(
      dataset.train_batches(start_step, total_steps, cfg.batch_size, cfg.seed,
                            jax.process_index(), jax.process_count()),
      lambda b: parallel.put_local_batch((b.images, b.labels), mesh), size=cfg.prefetch)
  pending: list = []
  t_log, step_log = time.perf_counter(), start_step
  timed_images, timed_seconds = 0, 0.0
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      images, labels = next(batches)
      packed, metrics = train_step(packed, images, labels)
      pending.append(metrics)
      progress.update()
      if step % cfg.log_every == 0 or step == total_steps:
        host = jax.device_get(pending)  # the only host sync between evaluations
        now = time.perf_counter()
        seconds, n = now - t_log, (step - step_log) * cfg.batch_size
        rec = {"kind": "train", "step": step, "epoch": round(step / spe, 3),
               "loss": float(np.mean([m["loss"] for m in host])),
               "acc": float(np.mean([m["acc"] for m in host])),
               "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
               "lr": float(schedule(step - 1)), "img_per_s": n / max(seconds, 1e-9),
               "time_s": round(elapsed_before + wall(), 3)}
        if step_log > start_step:  # the first interval includes compilation
          timed_images, timed_seconds = timed_images + n, timed_seconds + seconds
        log.write(rec)
        progress.log(step, rec)
        pending, t_log, step_log = [], now, step
        if not math.isfinite(rec["loss"]):
          raise FloatingPointError(f"loss is {rec['loss']} at step {step}; lower --lr or "
                                   "use --grad-clip")
      val = None
      if step % eval_every == 0 or step == total_steps:
        t0 = time.perf_counter()
        val = evaluate(step)
        if val["acc"] > best["val_acc"]:
          best = {"val_acc": val["acc"], "step": step}
        val["time_s"] = round(elapsed_before + wall(), 3)
        log.write(val)
        progress.message(
            f"step {step}: val loss {val['loss']:.4f} acc {val['acc']:.4f}"
            + (f"  EMA loss {val['ema_loss']:.4f} acc {val['ema_acc']:.4f}"
               if "ema_acc" in val else ""))
        t_log += time.perf_counter() - t0  # evaluation time is not training throughput
      if step % save_every == 0 or step == total_steps or (
          val is not None and best["step"] == step):
        checkpointer.save(step, unpack(packed), meta(step),
                          val_acc=None if val is None else val["acc"])
  finally:
    batches.close()
    progress.close()
    checkpointer.close()

  wall_s = elapsed_before + wall()
  summary = {"kind": "summary", "step": step, "model": cfg.model, "dataset": dataset.name,
             "best_val_acc": best["val_acc"], "best_step": best["step"],
             "final_val_acc": val["acc"] if val else None,
             "final_ema_val_acc": val.get("ema_acc") if val else None,
             "wall_s": round(wall_s, 2),
             "train_img_per_s": timed_images / timed_seconds if timed_seconds else None,
             "devices": mesh.size, "checkpoints": checkpointer.steps(),
             "skipped_files": len(dataset.skipped_files)}
  log.write(summary)
  if is_main and cfg.plot:
    plot_curves(log.records, out / PLOT_FILE, title=f"{cfg.model} on {dataset.name}")
  tput = summary["train_img_per_s"]
  progress.message(
      f"done: best val acc {best['val_acc']:.4f} (step {best['step']}), final "
      f"{summary['final_val_acc']:.4f}"
      + (f", EMA {summary['final_ema_val_acc']:.4f}" if summary["final_ema_val_acc"] else "")
      + f"; wall time {format_seconds(wall_s)}"
      + (f"; {tput:.0f} train img/s" if tput else "") + f"; outputs in {out}")

  state = unpack(packed)
  final_model = split.merge(state["params"], state["batch_stats"], state["rest"])
  ema_model = (split.merge(state["ema"]["params"], state["ema"]["batch_stats"], state["rest"])
               if "ema" in state else None)
  return FitResult(state, final_model, ema_model, log.records, summary, out)
