"""Schedules evaluated from the step inside jit: the commitment q (spec 1.5, "SFT-then-RL" as q: 1 -> 0) and the
learning rate (linear warm-up, then constant / cosine / linear decay).

Both take the step as a traced int32 and return a float32 scalar, so one compiled train step serves every q value
and every point of the schedule.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tsallis_jax.train.config import TrainConfig

Schedule = Callable[[jax.Array], jax.Array]


def q_schedule(kind: str, q_start: jax.Array | float, q_end: jax.Array | float, num_steps: int) -> Schedule:
  """q(step) for `kind` in constant | linear | step | cosine.

  linear and cosine move from q_start to q_end over `num_steps` and then hold q_end; step holds q_start for the
  first half and q_end afterwards (the paper's v2 reading of SFT-then-RL as a stepwise q = 1 -> 0 schedule).
  q_start and q_end may be traced (the demo passes q as an argument so runs share one compiled step).
  """
  if num_steps < 1 and kind != "constant":
    raise ValueError(f"q schedule {kind!r} needs num_steps >= 1, got {num_steps}")

  def fn(step: jax.Array) -> jax.Array:
    q0 = jnp.asarray(q_start, jnp.float32)
    q1 = jnp.asarray(q_end, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0.0, 1.0)
    if kind == "constant":
      return q0
    if kind == "linear":
      return q0 + (q1 - q0) * frac
    if kind == "cosine":
      return q1 + (q0 - q1) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if kind == "step":
      return jnp.where(frac < 0.5, q0, q1)
    raise ValueError(f"unknown q schedule {kind!r}; use constant, linear, step or cosine")

  return fn


def q_schedule_from_config(cfg: TrainConfig, q_start=None, q_end=None) -> Schedule:
  """The config's q schedule; `q_start`/`q_end` (possibly traced) override the config's values."""
  return q_schedule(cfg.q_schedule, cfg.q if q_start is None else q_start, cfg.q_end if q_end is None else q_end,
                    cfg.q_schedule_steps or cfg.num_steps)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up from learning_rate / warmup_steps over `warmup_steps`, then constant, cosine or linear decay
  to 0 at `num_steps`."""
  decay_steps = max(cfg.num_steps - cfg.warmup_steps, 1)
  if cfg.lr_schedule == "constant":
    after = optax.constant_schedule(cfg.learning_rate)
  elif cfg.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
  else:
    after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
  if cfg.warmup_steps == 0:
    return after
  warm = optax.linear_schedule(cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate,
                               cfg.warmup_steps)
  return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW (or plain SGD) with global-norm clipping and the learning-rate schedule (the paper names no optimiser).

  Note: Adam normalises each coordinate by its gradient's running RMS, which removes a *global* scale such as the
  common amplification P^-q of prompts that all have the same tiny P; the per-prompt reweighting remains (spec 1.4).
  Plain SGD keeps both, as in the paper's gradient-flow analysis (spec 1.5)."""
  if cfg.optimizer == "sgd":
    opt = optax.sgd(learning_rate_schedule(cfg))
  else:
    opt = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                      weight_decay=cfg.weight_decay)
  if cfg.grad_clip > 0:
    return optax.chain(clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` with the clip's choice made on one scalar: the gradients times a scale, one copy of
  the gradients fewer and no extra pass over them.

  optax selects per element, `select(norm < max_norm, g, g / norm * max_norm)`, and XLA materialises that select as
  a second copy of the gradients (the `smollm2` step's scratch: 1026 MB with it, 768 MB without, by
  `memory_analysis()`). Here the choice is made once, on the scale: 1 below the threshold (the gradients exactly) and
  max_norm / norm above it. A per-element multiply by a scalar fuses into each of AdamW's passes; a per-element
  divide (`g / norm * max_norm`, optax's expression) does not, because XLA does not duplicate a divide into several
  consumers: it wrote the clipped gradients out as one more temporary and read it back (on `smollm2` the step's
  optimizer took 0.29 s alone with the divide and 0.14 s with the multiply, and the train step 33 ms less; issue 17).
  Clipped gradients then equal optax's to float32 rounding (two roundings either way, in another order), unclipped
  ones bit for bit. Same state (empty) as optax's, so checkpoints are interchangeable."""

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    clip = ~(norm < max_norm)  # optax's trigger negated, so a NaN norm clips (to NaN) as there
    scale = jnp.where(clip, jnp.asarray(max_norm, norm.dtype) / norm, jnp.ones((), norm.dtype))
    updates = jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
