"""Input pipelines: built-in digits, synthetic, and image folders (decoded by grain workers).

Every pipeline is a pure function of (seed, step): the batch at step ``s`` holds the
samples ``perm_e[b * B:(b + 1) * B]`` with ``e, b = divmod(s, steps_per_epoch)`` and
``perm_e`` a permutation seeded by ``(seed, e)``, and random augmentation is seeded by
``(seed, global sample index)``.  So the data position of a run is just its step, resuming
needs no iterator state, and any number of processes read disjoint slices of the same
global batch.

In-memory sets (digits, synthetic) need only numpy.  Image folders decode JPEG/PNG files
in worker processes through grain (``pip install grain``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_SPLIT_SEED = 0  # the digits train/val split never changes with --seed


class DataError(ValueError):
  """A data set that cannot be used as given (missing folder, unreadable file, ...)."""


def steps_per_epoch(num_train: int, global_batch: int) -> int:
  if global_batch > num_train:
    raise DataError(f"batch size {global_batch} is larger than the training set "
                    f"({num_train} images); use a smaller --batch-size")
  return num_train // global_batch


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def global_sample_indices(step: int, global_batch: int, n: int, seed: int) -> np.ndarray:
  """Indices into the training set of the batch at 0-based ``step`` (drop-remainder epochs)."""
  epoch, b = divmod(step, steps_per_epoch(n, global_batch))
  return _epoch_permutation(seed, epoch, n)[b * global_batch:(b + 1) * global_batch]


def local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


@dataclasses.dataclass
class Batch:
  images: np.ndarray          # (B, H, W, C) float32 (normalised) or uint8 (see Dataset.mean)
  labels: np.ndarray          # (B,) int32
  mask: np.ndarray | None = None  # (B,) float32: 0 for padding (eval only)


class Dataset:
  """What the training loop needs from a data set."""
  name: str
  num_classes: int
  num_train: int
  num_val: int
  image_size: int
  channels: int = 3
  # Per-channel mean/std applied on device to uint8 images; None: images come normalised.
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  skipped_files: tuple[str, ...] = ()

  def train_batches(self, start_step: int, num_steps: int, global_batch: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    raise NotImplementedError

  def val_batches(self, global_batch: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
    raise NotImplementedError

  def describe(self) -> str:
    return (f"{self.name}: {self.num_train} train / {self.num_val} val images, "
            f"{self.num_classes} classes, {self.image_size}x{self.image_size}x{self.channels}")


# ------------------------------------------------------------------------- in memory


class InMemoryDataset(Dataset):
  """Arrays held in host memory; batches are gathered with numpy (no workers needed)."""

  def __init__(self, name, train_x, train_y, val_x, val_y, num_classes, *, shift: int = 0,
               mean=None, std=None):
    self.name = name
    self.train_x, self.train_y = train_x, train_y.astype(np.int32)
    self.val_x, self.val_y = val_x, val_y.astype(np.int32)
    self.num_classes = num_classes
    self.num_train, self.num_val = len(train_x), len(val_x)
    self.image_size = train_x.shape[1]
    self.channels = train_x.shape[3]
    self.shift = shift
    self.mean, self.std = mean, std
    # Background value for shifted-in pixels: the normalised value of black.
    self._fill = train_x.reshape(-1, self.channels).min(axis=0)

  def _augment(self, images: np.ndarray, seed: int, sample_ids: np.ndarray) -> np.ndarray:
    """Random translation by up to ``shift`` pixels, seeded per sample."""
    if self.shift == 0:
      return images
    s = self.shift
    n, h, w, c = images.shape
    padded = np.empty((n, h + 2 * s, w + 2 * s, c), images.dtype)
    padded[...] = self._fill
    padded[:, s:s + h, s:s + w] = images
    out = np.empty_like(images)
    for i, sid in enumerate(sample_ids):
      dy, dx = np.random.default_rng([seed, int(sid), 0xA06]).integers(0, 2 * s + 1, 2)
      out[i] = padded[i, dy:dy + h, dx:dx + w]
    return out

  def train_batches(self, start_step, num_steps, global_batch, seed, process_index=0,
                    process_count=1):
    sl = local_slice(global_batch, process_index, process_count)
    steps_per_epoch(self.num_train, global_batch)  # checks the batch fits
    for step in range(start_step, num_steps):
      idx = global_sample_indices(step, global_batch, self.num_train, seed)[sl]
      images = self.train_x[idx]
      # A sample's identity for augmentation: its position in the whole run.
      sample_ids = step * global_batch + np.arange(sl.start, sl.stop)
      yield Batch(self._augment(images, seed, sample_ids), self.train_y[idx])

  def val_batches(self, global_batch, process_index=0, process_count=1):
    sl = local_slice(global_batch, process_index, process_count)
    for start in range(0, self.num_val, global_batch):
      idx = np.arange(start, start + global_batch)
      valid = idx < self.num_val
      idx = np.where(valid, idx, 0)[sl]
      yield Batch(self.val_x[idx], self.val_y[idx], valid[sl].astype(np.float32))


def _resize_gray(images: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image
  return np.stack([
      np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize(
          (size, size), Image.Resampling.BILINEAR)) for im in images])


def load_digits(image_size: int = 32, channels: int = 3, augment: bool = True) -> InMemoryDataset:
  """scikit-learn's 1,797 8x8 handwritten digits, resized to ``image_size`` (bilinear),
  gray replicated to ``channels``, normalised with the training split's mean and std.
  The 80/20 train/val split is stratified by class and fixed (seed 0): 1,437 / 360."""
  try:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split
  except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
    raise DataError("the digits data set needs scikit-learn (pip install scikit-learn)") from e
  digits = sk_load_digits()
  images = digits.images.astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2,
                                        stratify=labels, random_state=DIGITS_SPLIT_SEED)
  images = _resize_gray(images, image_size)
  mean, std = images[train_idx].mean(), images[train_idx].std()
  images = ((images - mean) / std)[..., None].repeat(channels, axis=-1).astype(np.float32)
  return InMemoryDataset("digits", images[train_idx], labels[train_idx], images[val_idx],
                         labels[val_idx], 10, shift=max(1, image_size // 16) if augment else 0)


def make_synthetic(image_size: int, num_images: int = 1024, num_classes: int = 10,
                   channels: int = 3) -> InMemoryDataset:
  """Random uint8 images whose class sets a mean colour: learnable, cheap, no files.
  Used for throughput measurements and tests."""
  rng = np.random.default_rng(1234)
  n_val = max(num_images // 8, 1)
  labels = rng.integers(0, num_classes, num_images + n_val).astype(np.int32)
  class_colour = rng.integers(64, 192, (num_classes, channels))
  noise = rng.integers(-48, 48, (num_images + n_val, image_size, image_size, channels))
  images = np.clip(class_colour[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
  return InMemoryDataset("synthetic", images[:num_images], labels[:num_images],
                         images[num_images:], labels[num_images:], num_classes,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)


# ----------------------------------------------------------------------- image folder


def _list_split(root: Path, split: str, classes: list[str] | None):
  d = root / split
  if not d.is_dir():
    raise DataError(f"image folder {root} has no '{split}' directory: expected "
                    f"{d}/<class>/<image files>")
  found = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not found:
    raise DataError(f"{d} has no class folders: expected {d}/<class>/<image files>")
  if classes is None:
    classes = found
  else:
    extra = sorted(set(found) - set(classes))
    if extra:
      raise DataError(f"{d} has class folders that {root / 'train'} lacks: {', '.join(extra)}")
  files, labels = [], []
  for label, name in enumerate(classes):
    cdir = d / name
    if not cdir.is_dir():
      continue  # a class absent from val is allowed (fewer val images)
    imgs = sorted(str(p) for p in cdir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not imgs:
      raise DataError(f"class folder {cdir} has no image files "
                      f"({', '.join(IMAGE_EXTENSIONS)})")
    files += imgs
    labels += [label] * len(imgs)
  return classes, files, np.asarray(labels, np.int32)


def _open_rgb(path: str):
  from PIL import Image
  try:
    with Image.open(path) as im:
      return im.convert("RGB")
  except Exception as e:
    raise DataError(f"cannot decode image file {path}: {type(e).__name__}: {e} "
                    "(pass --skip-corrupt to skip unreadable files)") from e


def _is_readable(path: str) -> bool:
  try:
    _open_rgb(path)
    return True
  except DataError:
    return False


def random_resized_crop(img, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Inception-style crop (as torchvision's RandomResizedCrop), then resize to size x size."""
  from PIL import Image
  w, h = img.size
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      break
  else:  # fall back to a central crop of the nearest allowed aspect ratio
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, int(round(w / aspect))) if w / h < aspect else (int(round(h * aspect)), h)
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
  return img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def center_crop(img, size: int, crop_pct: float = 0.875):
  """Resize the shorter side to size / crop_pct, then take the central size x size."""
  from PIL import Image
  w, h = img.size
  short = int(round(size / crop_pct))
  nw, nh = (short, max(size, round(h * short / w))) if w <= h else (max(size, round(w * short / h)), short)
  img = img.resize((nw, nh), Image.Resampling.BILINEAR)
  x0, y0 = (nw - size) // 2, (nh - size) // 2
  return img.crop((x0, y0, x0 + size, y0 + size))


class _LoadTrainSample:
  """grain map: local sample number -> (uint8 image, label).  Picklable for workers."""

  def __init__(self, files, labels, global_batch, process_index, process_count, seed, size,
               augment):
    self.files, self.labels = files, labels
    self.global_batch, self.seed, self.size, self.augment = global_batch, seed, size, augment
    self.local = global_batch // process_count
    self.offset = process_index * self.local

  def __call__(self, j: int):
    step, pos = divmod(j, self.local)
    i = int(global_sample_indices(step, self.global_batch, len(self.files), self.seed)
            [self.offset + pos])
    img = _open_rgb(self.files[i])
    if self.augment:
      rng = np.random.default_rng([self.seed, step * self.global_batch + self.offset + pos, 0xC0])
      img = random_resized_crop(img, self.size, rng)
      if rng.random() < 0.5:
        img = img.transpose(0)  # PIL.Image.Transpose.FLIP_LEFT_RIGHT
    else:
      img = center_crop(img, self.size)
    return np.asarray(img, np.uint8), self.labels[i]


class _LoadValSample:
  def __init__(self, files, labels, size):
    self.files, self.labels, self.size = files, labels, size

  def __call__(self, i: int):
    if i >= len(self.files):  # padding of the last batch
      return np.zeros((self.size, self.size, 3), np.uint8), np.int32(0), np.float32(0)
    img = center_crop(_open_rgb(self.files[i]), self.size)
    return np.asarray(img, np.uint8), self.labels[i], np.float32(1)


def _require_grain():
  try:
    import grain
  except ImportError as e:
    raise DataError(
        "image-folder data sets are decoded by grain worker processes: pip install grain "
        "(the digits and synthetic data sets work without it)") from e
  return grain


def _stack(samples):
  return tuple(np.stack(x) for x in zip(*samples))


class ImageFolderDataset(Dataset):
  """``root/train/<class>/*.jpg|png...`` and ``root/val/<class>/...``.

  Training: random-resized-crop + horizontal flip; eval: resize + center crop (87.5%).
  Images go to the device as uint8 and are normalised there with ImageNet's mean/std.
  """

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, root: str | os.PathLike, image_size: int, *, workers: int = 4,
               augment: bool = True, skip_corrupt: bool = False):
    root = Path(root)
    if not root.is_dir():
      raise DataError(f"image folder {root} does not exist (or is not a directory); "
                      "--dataset takes 'digits', 'synthetic' or the path of a folder with "
                      "train/<class>/ and val/<class>/ subfolders")
    self.name = f"imagefolder:{root}"
    self.classes, self.train_files, self.train_labels = _list_split(root, "train", None)
    _, self.val_files, self.val_labels = _list_split(root, "val", self.classes)
    self.workers, self.augment, self.image_size = workers, augment, image_size
    self.skipped_files = ()
    if skip_corrupt:
      self._drop_unreadable()
    self.num_classes = len(self.classes)
    self.num_train, self.num_val = len(self.train_files), len(self.val_files)

  def _drop_unreadable(self):
    files = self.train_files + self.val_files
    if self.workers > 0:
      import multiprocessing
      from concurrent.futures import ProcessPoolExecutor
      # spawn, not fork: forking a process that runs JAX threads can deadlock.
      with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        ok = list(pool.map(_is_readable, files, chunksize=64))
    else:
      ok = [_is_readable(f) for f in files]
    n = len(self.train_files)
    keep_t, keep_v = np.asarray(ok[:n], bool), np.asarray(ok[n:], bool)
    self.skipped_files = tuple(f for f, good in zip(files, ok) if not good)
    self.train_files = [f for f, k in zip(self.train_files, keep_t) if k]
    self.train_labels = self.train_labels[keep_t]
    self.val_files = [f for f, k in zip(self.val_files, keep_v) if k]
    self.val_labels = self.val_labels[keep_v]
    if not self.train_files:
      raise DataError("no readable training images left after skipping corrupt files")

  def _loader(self, ds):
    grain = _require_grain()
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; use their defaults
      flags.FLAGS.mark_as_parsed()
    it = ds.to_iter_dataset()
    if self.workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    return iter(it)

  def train_batches(self, start_step, num_steps, global_batch, seed, process_index=0,
                    process_count=1):
    grain = _require_grain()
    steps_per_epoch(self.num_train, global_batch)  # checks the batch fits
    local = global_batch // process_count
    load = _LoadTrainSample(self.train_files, self.train_labels, global_batch, process_index,
                            process_count, seed, self.image_size, self.augment)
    ds = (grain.MapDataset.range(start_step * local, num_steps * local).map(load)
          .batch(local, drop_remainder=True, batch_fn=_stack))
    for images, labels in self._loader(ds):
      yield Batch(images, labels.astype(np.int32))

  def val_batches(self, global_batch, process_index=0, process_count=1):
    grain = _require_grain()
    sl = local_slice(global_batch, process_index, process_count)
    n_batches = -(-self.num_val // global_batch)
    # Global positions this process evaluates, batch by batch (the last batch padded).
    positions = [b * global_batch + p for b in range(n_batches) for p in range(sl.start, sl.stop)]
    load = _LoadValSample(self.val_files, self.val_labels, self.image_size)
    ds = grain.MapDataset.source(positions).map(load).batch(sl.stop - sl.start, batch_fn=_stack)
    for images, labels, mask in self._loader(ds):
      yield Batch(images, labels.astype(np.int32), mask)


def make_dataset(name: str, image_size: int, *, workers: int = 4, augment: bool = True,
                 skip_corrupt: bool = False, synthetic_size: int = 1024,
                 num_classes: int | None = None) -> Dataset:
  if name == "digits":
    return load_digits(image_size, augment=augment)
  if name == "synthetic":
    return make_synthetic(image_size, synthetic_size, num_classes or 10)
  return ImageFolderDataset(name, image_size, workers=workers, augment=augment,
                            skip_corrupt=skip_corrupt)


# ------------------------------------------------------------------------ prefetching


class Prefetcher:
  """Runs a host iterator in a thread and puts each batch on device ``size`` steps ahead.

  ``put`` turns a host Batch into device arrays (e.g. sharded over the mesh); transfers are
  asynchronous, so the step never waits on the host unless the pipeline is too slow.
  Errors in the producer (a corrupt file, say) are raised in the consumer.
  """

  _END = object()

  def __init__(self, iterator, put, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(iterator, put), daemon=True)
    self._thread.start()

  def _run(self, iterator, put):
    try:
      for batch in iterator:
        item = put(batch)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put(self._END)
    except BaseException as e:  # handed to the consumer
      self._queue.put(e)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is self._END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
