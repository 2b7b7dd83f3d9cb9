"""Model, optimizer and the jitted train / eval steps over split NNX state.

The model is split once (``nnx.split``) into a static graph definition and a state
{params, batch_stats, rest (RNG streams)}; the steps are pure functions of that state,
merged back into a module only inside the trace.  The train step takes the whole
TrainState (a dict) and donates it, so parameters and optimizer moments are updated in
place on the device.

The TrainState holds *plain nested dicts* of arrays (``nnx.to_pure_dict`` form), not
``nnx.State`` objects: every call of a jitted step flattens its arguments on the host, and
flattening ConvNeXt-T's TrainState (549 arrays) took 4.4 ms as nnx.State objects against
0.17 ms as plain dicts, and dispatching a step 3.8 vs 1.85 ms (H100 machine's host,
2026-11-25, ``python -m benchmarks.train_dispatch``): time the GPU otherwise sits idle
between synchronised steps, and the whole step time of small models.  ``SplitModel``
converts between the two forms (a leaf permutation computed once), so the model is still
an ordinary NNX module inside the steps.  Even as plain dicts the per-array cost remained
(4.0-5.1 ms to dispatch an identity step over the 549 arrays, H100 machine, 2026-11-26), so
``fit`` passes the steps the state packed into a few flat buffers (``StatePacker``,
``make_packed_train_step``, ``make_packed_eval_step``); checkpoints and ``fit``'s result
hold the nested-dict form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import convfirst_jax
from convfirst_jax.packing import TreePacker

TrainState = dict  # {"step", "params", "batch_stats", "rest", "opt_state"[, "ema"]}


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(model: str, num_classes: int, *, block_impl=None, dtype="float32",
                drop_path: float = 0.0, seed: int = 0, in_chans: int = 3, **kwargs):
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  return convfirst_jax.create_model(
      model, num_classes=num_classes, block_impl=block_impl, dtype=compute_dtype(dtype),
      param_dtype=jnp.float32, rngs=rngs, drop_path_rate=drop_path, in_chans=in_chans,
      **kwargs)


class StateCodec:
  """Converts one ``nnx.State`` layout to and from its plain nested-dict form (the same
  leaves, keyed like ``nnx.to_pure_dict``), by a leaf permutation worked out once."""

  def __init__(self, state: nnx.State):
    leaves, self.treedef = jax.tree.flatten(state)
    marked = nnx.to_pure_dict(jax.tree.unflatten(self.treedef, list(range(len(leaves)))))
    self.order, self.pure_treedef = jax.tree.flatten(marked)  # pure leaf j = state leaf order[j]
    if sorted(self.order) != list(range(len(leaves))):
      raise RuntimeError("nnx.to_pure_dict did not keep every leaf of the state once")

  def to_pure(self, state: nnx.State) -> dict:
    leaves = jax.tree.leaves(state)
    return jax.tree.unflatten(self.pure_treedef, [leaves[i] for i in self.order])

  def from_pure(self, pure: dict) -> nnx.State:
    leaves, treedef = jax.tree.flatten(pure)
    if treedef != self.pure_treedef:
      raise ValueError(f"state does not match the model: expected the layout "
                       f"{self.pure_treedef}, got {treedef}")
    out = [None] * len(leaves)
    for j, i in enumerate(self.order):
      out[i] = leaves[j]
    return jax.tree.unflatten(self.treedef, out)


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model's two graph definitions (train and eval mode) and its initial state as plain
  nested dicts (``params``, ``batch_stats``, ``rest``), with the codecs that turn such dicts
  back into ``nnx.State`` for ``merge``."""
  train_graph: Any
  eval_graph: Any
  params: dict
  batch_stats: dict
  rest: dict
  codecs: tuple  # StateCodec for params, batch_stats, rest

  @classmethod
  def from_model(cls, model: nnx.Module) -> "SplitModel":
    model.train()
    train_graph, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.BatchStat, ...)[0]
    model.train()
    codecs = tuple(StateCodec(s) for s in (params, batch_stats, rest))
    pure = [c.to_pure(s) for c, s in zip(codecs, (params, batch_stats, rest))]
    return cls(train_graph, eval_graph, *pure, codecs)

  def merge(self, params, batch_stats, rest, *, train: bool = False) -> nnx.Module:
    """A module (fresh Variables) with these plain-dict states."""
    states = [c.from_pure(s) for c, s in zip(self.codecs, (params, batch_stats, rest))]
    return nnx.merge(self.train_graph if train else self.eval_graph, *states)

  def split(self, model: nnx.Module) -> tuple[dict, dict, dict]:
    """(params, batch_stats, rest) of ``model`` as plain dicts."""
    _, *states = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return tuple(c.to_pure(s) for c, s in zip(self.codecs, states))


def lr_schedule(lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
  """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
  warmup_steps = min(max(warmup_steps, 0), total_steps - 1) if total_steps > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def make_optimizer(params, *, lr: float, total_steps: int, warmup_steps: int,
                   weight_decay: float, grad_clip: float | None = None,
                   min_lr: float = 0.0) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW (b2 = 0.999) on the schedule above; no weight decay on biases and norm scales
  (arrays of rank <= 1); optional global-norm gradient clipping first."""
  schedule = lr_schedule(lr, total_steps, warmup_steps, min_lr)
  decay_mask = jax.tree.map(lambda p: p.ndim > 1, params)
  parts = []
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule


def init_state(split: SplitModel, tx: optax.GradientTransformation,
               ema: bool = False) -> TrainState:
  state = {"step": jnp.zeros((), jnp.int32), "params": split.params,
           "batch_stats": split.batch_stats, "rest": split.rest,
           "opt_state": tx.init(split.params)}
  if ema:
    state["ema"] = {"params": jax.tree.map(jnp.copy, split.params),
                    "batch_stats": jax.tree.map(jnp.copy, split.batch_stats)}
  return state


def _normalise(images, mean, std):
  x = images.astype(jnp.float32)
  if mean is not None:
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(split: SplitModel, tx: optax.GradientTransformation, *, num_classes: int,
                    label_smoothing: float = 0.0, ema_decay: float | None = None,
                    mean=None, std=None):
  """The pure train step ``(state, images, labels) -> (state, metrics)`` (not yet jitted)."""

  def step_fn(state: TrainState, images, labels):
    x = _normalise(images, mean, std)

    def loss_fn(params):
      # merge builds fresh Variable objects in this trace: the model mutates batch
      # statistics and RNG counters, which NNX allows only for Variables created at the
      # current trace level.
      model = split.merge(params, state["batch_stats"], state["rest"], train=True)
      logits = model(x)
      loss = cross_entropy(logits, labels, num_classes, label_smoothing).mean()
      _, batch_stats, rest = split.split(model)
      return loss, (logits, batch_stats, rest)

    (loss, (logits, batch_stats, rest)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    new = {"step": step, "params": params, "batch_stats": batch_stats, "rest": rest,
           "opt_state": opt_state}
    if "ema" in state:
      # Warm-up of the decay (as in TF's ExponentialMovingAverage with num_updates): early
      # on the average follows the weights closely, which matters for short runs.
      t = step.astype(jnp.float32)
      d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
      avg = lambda e, p: e * d + p.astype(e.dtype) * (1.0 - d)
      new["ema"] = {"params": jax.tree.map(avg, state["ema"]["params"], params),
                    "batch_stats": jax.tree.map(avg, state["ema"]["batch_stats"], batch_stats)}
    metrics = {"loss": loss,
               "acc": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
               "grad_norm": optax.tree.norm(grads)}
    return new, metrics

  return step_fn


class StatePacker(TreePacker):
  """A TrainState as one flat buffer per dtype, for the jitted steps' arguments
  (``convfirst_jax.packing.TreePacker``).

  Every array argument of a jitted call costs host time at each call (flattening, buffer
  handling, donation): ConvNeXt-T's TrainState has 549 arrays, and dispatching even an
  identity step over it took 4.0-5.1 ms on the H100 machine's host (2026-11-26), about the
  whole gap between its synchronised and back-to-back training steps (``train.throughput``:
  XLA 65.79 -> 60.88 ms per synchronised step at batch 256 once packed, ``block_impl=None``
  46.05 -> 41.54).  A step unpacks at its start and packs its new state at the end inside
  the same program; the public form -- what ``fit`` returns and what checkpoints hold --
  stays the nested-dict TrainState."""


def make_packed_train_step(packer: StatePacker, split: SplitModel,
                           tx: optax.GradientTransformation, **kwargs):
  """``make_train_step``'s step over ``packer``-packed states:
  ``(packed, images, labels) -> (packed, metrics)``."""
  step_fn = make_train_step(split, tx, **kwargs)

  def packed_step(packed, images, labels):
    new, metrics = step_fn(packer.unpack(packed), images, labels)
    return packer.pack(new), metrics

  return packed_step


def make_eval_step(split: SplitModel, *, num_classes: int, mean=None, std=None):
  """``(params, batch_stats, rest, images, labels, mask) -> (loss sum, correct, count)``."""

  def eval_fn(params, batch_stats, rest, images, labels, mask):
    model = split.merge(params, batch_stats, rest, train=False)
    logits = model(_normalise(images, mean, std))
    loss = cross_entropy(logits, labels, num_classes)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.stack([jnp.sum(loss * mask), jnp.sum(correct * mask), jnp.sum(mask)])

  return eval_fn


def make_packed_eval_step(packer: StatePacker, split: SplitModel, *, ema: bool = False,
                          **kwargs):
  """``make_eval_step``'s step reading the weights (the EMA weights with ``ema``) from a
  ``packer``-packed state: ``(packed, images, labels, mask) -> (loss sum, correct, count)``."""
  eval_fn = make_eval_step(split, **kwargs)

  def packed_eval(packed, images, labels, mask):
    state = packer.unpack(packed)
    weights = state["ema"] if ema else state
    return eval_fn(weights["params"], weights["batch_stats"], state["rest"], images, labels,
                   mask)

  return packed_eval
