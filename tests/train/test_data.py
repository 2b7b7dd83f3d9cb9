"""Data pipelines: determinism of the step -> batch map, image folders, bad input."""

import numpy as np
import pytest
from PIL import Image

from tests.train.helpers import tiny_config
from train import DataError, fit
from train.data import ImageFolderDataset, load_digits, make_synthetic


def _folder(root, classes=("cat", "dog"), per_class=6, corrupt=None):
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(per_class if split == "train" else 2):
        arr = rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)
        arr[..., c] = 255  # learnable colour cue
        Image.fromarray(arr).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
  if corrupt is not None:
    p = root / corrupt
    p.write_bytes(b"this is not an image" * 10)
  return root


def test_digits_split_and_shape():
  ds = load_digits(32)
  assert (ds.num_train, ds.num_val, ds.num_classes) == (1437, 360, 10)
  assert ds.train_x.shape[1:] == (32, 32, 3) and ds.train_x.dtype == np.float32
  assert abs(float(ds.train_x.mean())) < 1e-3
  # stratified: every class is in val with 36 +- 1 images
  assert np.all(np.abs(np.bincount(ds.val_y) - 36) <= 1)


def test_batches_are_a_function_of_the_step():
  ds = load_digits(32)
  whole = list(ds.train_batches(0, 50, 64, seed=3))
  tail = list(ds.train_batches(47, 50, 64, seed=3))  # a resumed run starting at step 47
  for a, b in zip(whole[47:], tail):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  # two processes read the two halves of each global batch
  halves = [list(ds.train_batches(0, 3, 64, seed=3, process_index=p, process_count=2))
            for p in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step].labels, halves[1][step].labels]), whole[step].labels)
  # an epoch (22 steps of 64) visits distinct images, the next epoch reshuffles
  epoch0 = np.concatenate([b.labels for b in whole[:22]])
  epoch1 = np.concatenate([b.labels for b in whole[22:44]])
  assert not np.array_equal(epoch0, epoch1)


def test_val_batches_pad_with_mask():
  ds = make_synthetic(32, num_images=80)  # 10 val images
  batches = list(ds.val_batches(8))
  assert [int(b.mask.sum()) for b in batches] == [8, 2]
  assert all(len(b.labels) == 8 for b in batches)


def test_image_folder_trains_with_workers(tmp_path):
  root = _folder(tmp_path / "data")
  ds = ImageFolderDataset(root, 32, workers=2)
  assert ds.num_classes == 2 and ds.num_train == 12 and ds.num_val == 4
  first = list(ds.train_batches(0, 4, 4, seed=0))
  again = list(ImageFolderDataset(root, 32, workers=0).train_batches(2, 4, 4, seed=0))
  assert first[0].images.shape == (4, 32, 32, 3) and first[0].images.dtype == np.uint8
  np.testing.assert_array_equal(first[2].images, again[0].images)
  val = list(ds.val_batches(4))
  assert len(val) == 1 and val[0].mask.sum() == 4
  result = fit(tiny_config(tmp_path, dataset=str(root), batch_size=4, steps=6, eval_every=6,
                           workers=2, plot=False), quiet=True)
  assert result.summary["step"] == 6


def test_missing_directory(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path / "nope")):
    ImageFolderDataset(tmp_path / "nope", 32)
  (tmp_path / "data" / "train" / "a").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / "a" / "x.png")
  with pytest.raises(DataError, match="no 'val' directory"):
    ImageFolderDataset(tmp_path / "data", 32)


def test_empty_class_folder(tmp_path):
  root = _folder(tmp_path / "data")
  (root / "train" / "empty").mkdir()
  with pytest.raises(DataError, match=r"class folder .*train/empty has no image files"):
    ImageFolderDataset(root, 32)


def test_corrupt_image_named_or_skipped(tmp_path):
  root = _folder(tmp_path / "data", corrupt="train/dog/bad.jpg")
  with pytest.raises(DataError, match=r"cannot decode image file .*train/dog/bad\.jpg.*--skip-corrupt"):
    fit(tiny_config(tmp_path, dataset=str(root), batch_size=13, steps=2, workers=0,
                    plot=False), quiet=True)
  ds = ImageFolderDataset(root, 32, workers=2, skip_corrupt=True)
  assert ds.num_train == 12 and len(ds.skipped_files) == 1
  assert ds.skipped_files[0].endswith("bad.jpg")


def test_batch_larger_than_data(tmp_path):
  with pytest.raises(DataError, match="larger than the training set"):
    fit(tiny_config(tmp_path, batch_size=4096), quiet=True)
