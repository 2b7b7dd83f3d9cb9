"""End-to-end: the loss falls, outputs (metrics, plot, checkpoints) appear, the API and CLI
agree."""

import json

import numpy as np
import pytest
from flax import nnx

from tests.train.helpers import CHECKPOINTED_RUN, TINY, run_python, tiny_config
from train import CheckpointError, TrainConfig, fit
from train.cli import build_parser, config_from_args
from train.loop import _schedule_lengths
from train.metrics import read_metrics


def test_loss_falls_and_outputs_written(tmp_path):
  cfg = tiny_config(tmp_path, steps=45, ema_decay=0.9, keep=1, save_every=15)
  result = fit(cfg, quiet=True)
  train = [r for r in result.records if r["kind"] == "train"]
  assert len(train) == 9
  first, last = train[0]["loss"], np.mean([r["loss"] for r in train[-2:]])
  assert last < 0.6 * first, (first, last)
  val = [r for r in result.records if r["kind"] == "val"]
  assert [r["step"] for r in val] == [15, 30, 45]
  assert val[-1]["acc"] > 0.6 and "ema_acc" in val[-1]
  out = tmp_path / "run"
  plot = out / "curves.png"
  assert plot.stat().st_size > 10_000
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  records = read_metrics(out / "metrics.jsonl")
  assert records[-1]["kind"] == "summary"
  assert records[-1]["best_val_acc"] == max(r["acc"] for r in val)
  assert json.loads((out / "config.json").read_text())["model_kwargs"] == TINY
  # keep=1 newest + the best by val accuracy (here the newest is also the best or not).
  best_step = records[-1]["best_step"]
  assert set(records[-1]["checkpoints"]) == {45, best_step}
  # The returned models run and agree with the recorded final accuracy's sign of life.
  # (Jitted: one compilation instead of one per eager op, ~3 s less on a 2-core CPU.)
  logits = nnx.jit(lambda m, x: m(x))(result.model, np.zeros((2, 32, 32, 3), np.float32))
  assert logits.shape == (2, 10) and result.ema_model is not None


def test_refuses_to_overwrite_checkpoints(tmp_path):
  cfg = tiny_config(tmp_path, **CHECKPOINTED_RUN)
  fit(cfg, quiet=True)
  with pytest.raises(CheckpointError, match="already holds checkpoints"):
    fit(cfg, quiet=True)


def test_resume_rejects_changed_settings(tmp_path):
  fit(tiny_config(tmp_path, **CHECKPOINTED_RUN), quiet=True)
  with pytest.raises(CheckpointError, match="batch_size"):
    fit(tiny_config(tmp_path, steps=10, batch_size=16, resume=True), quiet=True)


def test_cli_defaults_match_config():
  cfg = config_from_args([])
  assert cfg == TrainConfig()
  cfg = config_from_args(["--epochs", "3", "--block-impl", "xla", "--grad-clip", "0",
                          "--ema-decay", "0.999", "--model-kwargs", '{"depths": [1, 1, 1, 1]}'])
  assert cfg.epochs == 3 and cfg.steps is None and cfg.block_impl == "xla"
  assert cfg.grad_clip is None and cfg.ema_decay == 0.999
  assert cfg.model_kwargs == {"depths": [1, 1, 1, 1]}


def test_run_length_from_steps_epochs_or_default():
  # epochs alone trains by epochs (steps defaults to None, not to 300); neither gives 300.
  assert TrainConfig().steps is None and TrainConfig(epochs=2).validate().steps is None
  assert _schedule_lengths(TrainConfig(epochs=2), 22) == (44, 2)
  assert _schedule_lengths(TrainConfig(epochs=0.5), 22) == (11, 1)
  assert _schedule_lengths(TrainConfig().validate(), 22) == (300, 15)
  assert _schedule_lengths(TrainConfig(steps=40), 22) == (40, 2)
  assert _schedule_lengths(TrainConfig(steps=40, epochs=2), 22) == (40, 2)  # steps wins
  assert _schedule_lengths(TrainConfig(epochs=2, warmup_epochs=1), 22) == (44, 22)
  assert _schedule_lengths(config_from_args([]), 22) == (300, 15)
  assert _schedule_lengths(config_from_args(["--epochs", "2"]), 22) == (44, 2)


def test_cli_help_and_bad_model_kwargs(capsys):
  text = " ".join(build_parser().format_help().split())  # whatever the terminal's width
  assert "(default: True)" not in text and "(default: False)" not in text
  assert "(default: None)" not in text
  assert "(default: 300 unless --epochs is given)" in text
  with pytest.raises(SystemExit):
    config_from_args(["--model-kwargs", "{depths: 1}"])
  assert "--model-kwargs: not valid JSON" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    config_from_args(["--model-kwargs", "[1, 2]"])
  assert "--model-kwargs: must be a JSON object" in capsys.readouterr().err


def test_cli_reports_unsupported_block_impl(tmp_path):
  # "pallas" on a CPU: the kernels' NotImplementedError as an error message with what the
  # CLI user can do instead (not the library's "pass interpret=True"), exit status 2.
  r = run_python(["-m", "train", "--block-impl", "pallas", "--model-kwargs", json.dumps(TINY),
                  "--steps", "2", "--no-progress", "--output-dir", str(tmp_path / "run")],
                 env={"JAX_PLATFORMS": "cpu"}, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "error:" in r.stderr and "Traceback" not in r.stderr
  assert "--block-impl auto" in r.stderr and "interpret=True" not in r.stderr


def test_cli_reports_bad_dataset_path(tmp_path):
  r = run_python(["-m", "train", "--dataset", str(tmp_path / "nowhere"), "--output-dir",
                  str(tmp_path / "run")], timeout=120)
  assert r.returncode == 2
  assert "error:" in r.stderr and str(tmp_path / "nowhere") in r.stderr


def test_throughput_script_runs(tmp_path):
  from train.throughput import main
  out = tmp_path / "t.json"
  r = main(["--model", "convnext_atto", "--batch-size", "4", "--image-size", "32",
            "--steps", "2", "--warmup", "1", "--dtype", "bfloat16", "--num-classes", "10",
            "--model-kwargs", '{"depths": [1, 1, 1, 1]}', "--json", str(out)])
  assert r["img_per_s"] > 0 and np.isfinite(r["final_loss"])
  saved = json.loads(out.read_text())
  assert saved["model"] == "convnext_atto" and saved["model_kwargs"] == {"depths": [1, 1, 1, 1]}
  with pytest.raises(SystemExit):  # not a JSON object: argparse error (exit 2)
    main(["--model-kwargs", "[1, 2]"])
