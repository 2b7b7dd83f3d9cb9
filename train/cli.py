"""``python -m train`` / ``convfirst-train``: command-line front end of ``train.fit``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from train.config import DEFAULT_STEPS, TrainConfig

_D = TrainConfig()


def _none_or(type_):
  def parse(s):
    return None if s.lower() in ("none", "off", "0") and type_ is not int else type_(s)
  parse.__name__ = type_.__name__
  return parse


def json_object(text: str) -> dict:
  """argparse type of ``--model-kwargs``: a JSON object, else an error that says why."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"not valid JSON: {e}: {text!r}") from None
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
  return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends an option's default to its help where it tells something: not for on/off
  flags (``--no-augment``: the default is not to pass it) nor for a default of None (the
  help text says what happens then)."""

  def _get_help_string(self, action):
    if action.nargs == 0 or action.default is None:
      return action.help
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m train",
      description="Train a ConvNeXt / ConvFirstNet model. With no flags: convnext_atto on "
      f"the built-in digits data set at 32x32 for {DEFAULT_STEPS} steps (1.5 to 4.5 minutes "
      "on a 2-core CPU, depending on the machine).",
      formatter_class=_HelpFormatter)
  g = p.add_argument_group("model")
  g.add_argument("--model", default=_D.model, help="a name from convfirst_jax.list_models()")
  g.add_argument("--block-impl", default="auto", choices=["auto", "xla", "pallas"],
                 help="residual block implementation (auto: fastest supported)")
  g.add_argument("--dtype", default=_D.dtype, choices=["float32", "bfloat16"],
                 help="compute dtype (parameters and optimizer state stay float32)")
  g.add_argument("--drop-path", type=float, default=_D.drop_path, help="stochastic depth rate")
  g.add_argument("--model-kwargs", type=json_object, default={},
                 help='more create_model arguments as a JSON object, e.g. '
                 '\'{"depths": [1, 1, 2, 1]}\'')
  g = p.add_argument_group("data")
  g.add_argument("--dataset", default=_D.dataset,
                 help="'digits' (built in), 'synthetic' (random, for throughput) or the path "
                 "of an image folder with train/<class>/ and val/<class>/")
  g.add_argument("--image-size", type=int, default=_D.image_size,
                 help="square input resolution in pixels (at least 32)")
  g.add_argument("--batch-size", type=int, default=_D.batch_size,
                 help="global batch size (a multiple of the number of devices)")
  g.add_argument("--workers", type=int, default=_D.workers,
                 help="image-folder decoding processes (0: decode in this process)")
  g.add_argument("--skip-corrupt", action="store_true",
                 help="image folder: check every file first and skip (and count) unreadable ones")
  g.add_argument("--no-augment", dest="augment", action="store_false",
                 help="no random crops / flips / shifts")
  g.add_argument("--synthetic-size", type=int, default=_D.synthetic_size,
                 help="synthetic data set: training images")
  g.add_argument("--num-classes", type=int, default=None,
                 help="synthetic data set: classes (default: 10)")
  g = p.add_argument_group("optimisation")
  length = g.add_mutually_exclusive_group()
  length.add_argument("--steps", type=int, default=None,
                      help=f"training steps (default: {DEFAULT_STEPS} unless --epochs is "
                      "given)")
  length.add_argument("--epochs", type=float, default=None,
                      help="training length in epochs (may be fractional) instead of --steps")
  g.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (AdamW)")
  g.add_argument("--min-lr", type=float, default=_D.min_lr, help="learning rate at the end")
  warm = g.add_mutually_exclusive_group()
  warm.add_argument("--warmup-steps", type=int, default=None,
                    help="linear warm-up steps (default: 5%% of the run)")
  warm.add_argument("--warmup-epochs", type=float, default=None,
                    help="linear warm-up in epochs instead of --warmup-steps")
  g.add_argument("--weight-decay", type=float, default=_D.weight_decay,
                 help="AdamW decoupled weight decay (not on biases and norm scales)")
  g.add_argument("--label-smoothing", type=float, default=_D.label_smoothing,
                 help="label smoothing of the cross-entropy loss (0: none)")
  g.add_argument("--grad-clip", type=_none_or(float), default=_D.grad_clip,
                 help="clip gradients to this global norm (0: off)")
  g.add_argument("--ema-decay", type=_none_or(float), default=_D.ema_decay,
                 help="keep an exponential moving average of the weights with this decay "
                 "(e.g. 0.999) and evaluate it too (default: no EMA)")
  g.add_argument("--seed", type=int, default=_D.seed,
                 help="seed of the initial weights, data order, augmentation and drop path")
  g = p.add_argument_group("evaluation, logging and checkpoints")
  g.add_argument("--output-dir", default=_D.output_dir,
                 help="config.json, metrics.jsonl, curves.png and checkpoints/ go here")
  g.add_argument("--eval-every", type=int, default=None, help="steps (default: every epoch)")
  g.add_argument("--log-every", type=int, default=_D.log_every,
                 help="steps between metric records (each costs one host sync)")
  g.add_argument("--save-every", type=int, default=None,
                 help="steps between checkpoints (default: at every evaluation)")
  g.add_argument("--keep", type=int, default=_D.keep,
                 help="newest checkpoints to keep (the best by val accuracy is kept as well)")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --output-dir from its newest checkpoint")
  g.add_argument("--resume-step", type=int, default=None,
                 help="continue from this checkpoint step instead (newer ones are moved to "
                 "checkpoints.superseded/)")
  g.add_argument("--sync-checkpointing", dest="async_checkpointing", action="store_false",
                 help="write checkpoints in the foreground")
  g.add_argument("--no-progress", dest="progress", action="store_false",
                 help="no progress bar (it is also off when stderr is not a terminal)")
  g.add_argument("--no-plot", dest="plot", action="store_false",
                 help="do not write curves.png")
  g.add_argument("--prefetch", type=int, default=_D.prefetch,
                 help="batches transferred to the device ahead of the step")
  g.add_argument("--num-devices", type=int, default=None,
                 help="data-parallel over the first N devices (default: all)")
  g = p.add_argument_group("multi-host (jax.distributed.initialize)")
  g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  g.add_argument("--num-processes", type=int, default=None, help="processes in the job")
  g.add_argument("--process-id", type=int, default=None, help="this process's index (0-based)")
  return p


def config_from_args(argv=None) -> TrainConfig:
  args = vars(build_parser().parse_args(argv))
  if args["block_impl"] == "auto":
    args["block_impl"] = None
  if args["grad_clip"] == 0:
    args["grad_clip"] = None
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  return TrainConfig(**{k: v for k, v in args.items() if k in known})


def unsupported_message(error: NotImplementedError, cfg: TrainConfig) -> str:
  """The CLI's message for a kernel that cannot run here (e.g. ``--block-impl pallas`` on a
  CPU): the library's reason without its advice to pass ``interpret=True`` (a Python
  argument the CLI does not have), and what to pass instead."""
  reason = re.sub(r"\s*(?:;\s*pass interpret=True[^;)]*|\(pass interpret=True[^)]*\))", "",
                  str(error))
  if cfg.block_impl == "pallas":
    hint = ("--block-impl pallas forces Pallas kernels, which cannot run here; on this "
            "backend use --block-impl auto (Pallas only where it can run) or --block-impl xla")
  else:
    hint = (f"--block-impl {cfg.block_impl or 'auto'} ran into an unsupported kernel; "
            "try --block-impl xla")
  return f"{reason}\n{hint}"


def main(argv=None) -> int:
  from train.checkpoint import CheckpointError
  from train.data import DataError

  cfg = config_from_args(argv)
  try:
    from train.loop import fit
    fit(cfg)
  except (DataError, CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NotImplementedError as e:
    print(f"error: {unsupported_message(e, cfg)}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted; resume with the same command and --resume", file=sys.stderr)
    sys.exit(130)
  return 0


if __name__ == "__main__":
  main()
