"""Metrics as JSON lines, a tqdm progress bar, and the final plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


class MetricsLog:
  """Appends one JSON object per line; on resume drops records past the resumed step, so
  the file reads as one uninterrupted run."""

  def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
    self.path = Path(path)
    self.enabled = enabled
    self.records: list[dict] = []
    if not enabled:
      return
    if resume_step is not None and self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if rec.get("step", 0) <= resume_step and rec.get("kind") != "summary":
          kept.append(rec)
      self.records = kept
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
      self.path.write_text("")

  def write(self, record: dict) -> None:
    self.records.append(record)
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(path: str | Path) -> list[dict]:
  out = []
  for line in Path(path).read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


class Progress:
  """tqdm bar with loss / accuracy / images per second (ETA from tqdm).  Without a terminal
  (or with ``enabled=False``) it prints one plain line per logged step instead."""

  def __init__(self, total: int, initial: int, *, enabled: bool, quiet: bool = False):
    self.bar = None
    self.quiet = quiet
    if enabled and not quiet and sys.stderr.isatty():
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                      smoothing=0.1)
    self.total = total

  def update(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def log(self, step: int, rec: dict) -> None:
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['acc']:.3f}",
                           img_s=f"{rec['img_per_s']:.0f}", refresh=False)
    elif not self.quiet:
      print(f"step {step}/{self.total}  loss {rec['loss']:.4f}  acc {rec['acc']:.3f}  "
            f"lr {rec['lr']:.2e}  {rec['img_per_s']:.0f} img/s", flush=True)

  def message(self, text: str) -> None:
    if self.quiet:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
  """Train and val loss / accuracy against the step, as a PNG (matplotlib, Agg)."""
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  train = [r for r in records if r.get("kind") == "train"]
  val = [r for r in records if r.get("kind") == "val"]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train", lw=1)
    ax_acc.plot(steps, [r["acc"] for r in train], label="train", lw=1)
  if val:
    steps = [r["step"] for r in val]
    ax_loss.plot(steps, [r["loss"] for r in val], "o-", label="val", ms=3)
    ax_acc.plot(steps, [r["acc"] for r in val], "o-", label="val", ms=3)
    if any("ema_acc" in r for r in val):
      ema = [r for r in val if "ema_acc" in r]
      ax_loss.plot([r["step"] for r in ema], [r["ema_loss"] for r in ema], "s--",
                   label="val (EMA)", ms=3)
      ax_acc.plot([r["step"] for r in ema], [r["ema_acc"] for r in ema], "s--",
                  label="val (EMA)", ms=3)
  ax_loss.set(xlabel="step", ylabel="loss (train: with label smoothing)", title="loss")
  ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy", ylim=(0, 1.01))
  for ax, loc in ((ax_loss, "upper right"), (ax_acc, "lower right")):
    ax.grid(alpha=0.3)
    ax.legend(loc=loc)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def format_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  m, s = divmod(int(round(s)), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Timer:
  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.start
