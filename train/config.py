"""TrainConfig: every knob of a training run, shared by the CLI and the Python API."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

DTYPES = ("float32", "bfloat16")
DEFAULT_STEPS = 300  # the run's length when neither steps nor epochs is given


@dataclasses.dataclass
class TrainConfig:
  """One training run.  ``train.fit(TrainConfig(...))`` and ``python -m train`` take the same
  fields (the CLI spells ``block_impl`` as ``--block-impl`` and so on).

  The defaults train convnext_atto on the built-in digits data set at 32x32 for 300 steps of
  64 (13 epochs): 1.5 to 4.5 minutes on a 2-core CPU, depending on the machine, ending at
  98.9% validation accuracy (README).  ``steps`` or ``epochs`` sets the length (``steps``
  wins if both are given); with neither it is ``DEFAULT_STEPS`` (300) steps.
  """

  # model
  model: str = "convnext_atto"
  block_impl: str | None = None          # "xla" | "pallas" | None (fastest supported)
  dtype: str = "float32"                 # compute dtype; parameters stay float32
  drop_path: float = 0.0
  model_kwargs: dict = dataclasses.field(default_factory=dict)  # more create_model arguments
  # data
  dataset: str = "digits"                # "digits" | "synthetic" | path of an image folder
  image_size: int = 32
  batch_size: int = 64                   # global batch (all devices, all processes)
  workers: int = 4                       # image-folder decoding processes (0: in process)
  skip_corrupt: bool = False             # image folder: scan, skip and count unreadable files
  synthetic_size: int = 1024             # synthetic: images per epoch
  num_classes: int | None = None         # synthetic only; others read it from the data
  augment: bool = True
  # schedule
  epochs: float | None = None            # either epochs or steps; steps wins if both given
  steps: int | None = None               # neither: DEFAULT_STEPS (300)
  lr: float = 2e-3
  min_lr: float = 1e-5
  warmup_steps: int | None = None        # default: warmup_epochs, else 5% of the steps
  warmup_epochs: float | None = None
  weight_decay: float = 0.05
  label_smoothing: float = 0.1
  grad_clip: float | None = 1.0          # global-norm clip; None or 0 disables
  ema_decay: float | None = None         # e.g. 0.999: keep and evaluate an EMA of the weights
  seed: int = 0
  # evaluation, logging, checkpoints
  output_dir: str = "runs/default"
  eval_every: int | None = None          # steps; default: once an epoch and at the end
  log_every: int = 10                    # steps between metric records (host syncs)
  save_every: int | None = None          # steps; default: at every evaluation and at the end
  keep: int = 2                          # newest checkpoints kept (the best one is kept too)
  resume: bool = False                   # continue from the newest checkpoint in output_dir
  resume_step: int | None = None         # or from this step
  async_checkpointing: bool = True
  progress: bool = True                  # tqdm bar (only shown on a terminal)
  plot: bool = True
  prefetch: int = 2                      # batches put on device ahead of the step
  num_devices: int | None = None         # use the first N devices (default: all)
  # multi-host (jax.distributed.initialize); leave unset for one process
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def validate(self) -> "TrainConfig":
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.block_impl not in (None, "xla", "pallas"):
      raise ValueError(f"block_impl must be 'xla', 'pallas' or None, got {self.block_impl!r}")
    if self.image_size < 32:
      raise ValueError(f"image_size must be at least 32 (the models' total stride), "
                       f"got {self.image_size}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"steps must be positive, got {self.steps}")
    if self.epochs is not None and self.epochs <= 0:
      raise ValueError(f"epochs must be positive, got {self.epochs}")
    if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.keep < 1:
      raise ValueError(f"keep must be at least 1, got {self.keep}")
    if self.log_every < 1:
      raise ValueError(f"log_every must be at least 1, got {self.log_every}")
    for name in ("save_every", "eval_every"):
      v = getattr(self, name)
      if v is not None and v < 1:
        raise ValueError(f"{name} must be at least 1, got {v}")
    return self

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json_file(cls, path: str | Path) -> "TrainConfig":
    data = json.loads(Path(path).read_text())
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


# Fields that must match between a run and its resumption: they change the data order, the
# model or the meaning of a step.  (Logging, checkpoint cadence and the like may change.)
RESUME_INVARIANT_FIELDS = ("model", "dataset", "image_size", "batch_size", "seed", "dtype",
                           "drop_path", "augment", "label_smoothing", "ema_decay",
                           "synthetic_size", "num_classes", "model_kwargs")
