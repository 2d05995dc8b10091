"""The Tsallis q-logarithm, the exact J_Q loss and the per-example amplification P^-q.

Spec sections 1.2 (ln_q and J_Q) and 1.4 (gradient geometry, amplification). Everything here works on
log-probabilities so that tiny P (1e-30 and below, or exactly 0 as log P = -inf) stays finite and differentiable.

`q` may be a Python float (validated eagerly: a value outside [0, 1] raises `ValueError`) or a JAX scalar, possibly
traced inside `jit` (a q schedule in a train step). A traced q cannot be validated inside `jit`; validate schedules
when the config is built with `validate_q_schedule`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "q_log",
  "q_log_of_log",
  "jq_loss",
  "amplification",
  "check_q",
  "validate_q_schedule",
]

# Below this |x| the relative exponential expm1(x)/x is evaluated by its Taylor series (error < x^3/24 ~ 1e-19).
_EXPREL_SERIES_BELOW = 1e-6


def check_q(q) -> None:
  """Raises ValueError if a concrete `q` lies outside [0, 1] or is not finite; traced values pass unchecked.

  Spec 1.2: q in [0, 1] throughout. A traced q (inside `jit`) cannot be inspected; check it at config time with
  `validate_q_schedule`.
  """
  if isinstance(q, jax.core.Tracer):
    return
  if isinstance(q, numbers.Number) or isinstance(q, (np.ndarray, np.generic, jax.Array)):
    q_arr = np.asarray(q, dtype=np.float64)
    if q_arr.ndim != 0:
      raise ValueError(f"q must be a scalar, got an array of shape {q_arr.shape}; pass one q per call.")
    if not (np.isfinite(q_arr) and 0.0 <= float(q_arr) <= 1.0):
      raise ValueError(f"q must lie in [0, 1] (spec 1.2), got q={float(q_arr)!r}; clip or fix the q schedule.")
    return
  raise ValueError(f"q must be a real scalar in [0, 1], got {type(q).__name__}: {q!r}.")


def validate_q_schedule(schedule: Callable[[int], float], steps: Iterable[int]) -> None:
  """Checks a q schedule (step -> q) at config time, for every step in `steps`, outside `jit`.

  Raises ValueError naming the first step whose q lies outside [0, 1].
  """
  for step in steps:
    q = schedule(step)
    try:
      check_q(q)
    except ValueError as err:
      raise ValueError(f"q schedule at step {step}: {err}") from None


def _exprel(x: jax.Array) -> jax.Array:
  """expm1(x)/x with the removable singularity at 0 filled by its series; finite value and gradient everywhere."""
  small = jnp.abs(x) < _EXPREL_SERIES_BELOW
  safe_x = jnp.where(small, 1.0, x)  # double where: the unused branch never sees x = 0
  series = 1.0 + x / 2.0 + x * x / 6.0
  return jnp.where(small, series, jnp.expm1(safe_x) / safe_x)


def _q_log_of_log_formula(log_u: jax.Array, q: jax.Array) -> jax.Array:
  """ln_q from log u as log u * exprel((1-q) log u); the value is accurate, its autograd derivative is not."""
  is_zero = jnp.isneginf(log_u)
  safe_log_u = jnp.where(is_zero, 0.0, log_u)
  finite_part = safe_log_u * _exprel((1.0 - q) * safe_log_u)
  one_minus_q = 1.0 - q
  safe_one_minus_q = jnp.where(one_minus_q > 0, one_minus_q, 1.0)
  at_zero = jnp.where(one_minus_q > 0, -1.0 / safe_one_minus_q, -jnp.inf)
  return jnp.where(is_zero, at_zero, finite_part)


@jax.custom_jvp
def _q_log_of_log(log_u: jax.Array, q: jax.Array) -> jax.Array:
  return _q_log_of_log_formula(log_u, q)


@_q_log_of_log.defjvp
def _q_log_of_log_jvp(primals, tangents):
  """d ln_q(u) / d log u = u^(1-q) = exp((1-q) log u) exactly (spec 1.4).

  Autograd through exprel's quotient would subtract terms of size ~1/|log u| to get u^(1-q): in float32 that loses
  everything once u^(1-q) < ~1e-8 (81% error at q=0, log u=-20), exactly the cold-start regime. The derivative in q
  (only used if q itself is differentiated) is left to autograd of the formula.
  """
  log_u, q = primals
  log_u_dot, q_dot = tangents
  value = _q_log_of_log_formula(log_u, q)
  is_zero = jnp.isneginf(log_u)
  safe_log_u = jnp.where(is_zero, 0.0, log_u)
  d_log_u = jnp.where(is_zero, 0.0, jnp.exp((1.0 - q) * safe_log_u))
  _, q_part = jax.jvp(lambda q_: _q_log_of_log_formula(log_u, q_), (q,), (q_dot,))
  return value, d_log_u * log_u_dot + q_part


def q_log_of_log(log_u: jax.Array, q) -> jax.Array:
  """ln_q(u) from log u, elementwise: (u^(1-q) - 1)/(1-q), and log u at q = 1 (spec 1.2).

  Written as log u * exprel((1-q) log u), which is exact and smooth through q = 1 and accurate for u near 1. Its
  derivative in log u is the exact u^(1-q) (a custom JVP), so gradients stay accurate for tiny u.
  log u = -inf (u = 0) gives -1/(1-q) for q < 1 and -inf at q = 1, with a finite (zero) gradient.
  """
  check_q(q)
  log_u = jnp.asarray(log_u, jnp.float32)
  q = jnp.asarray(q, jnp.float32)
  return _q_log_of_log(log_u, q)


@jax.custom_jvp
def _q_log(u: jax.Array, q: jax.Array) -> jax.Array:
  return _q_log_of_log(jnp.log(u), q)


@_q_log.defjvp
def _q_log_jvp(primals, tangents):
  """d ln_q(u) / du = u^-q = exp(-q log u) (spec 1.4), saturated at the largest float32.

  The chain rule through log would multiply d ln_q / d log u = 0 by d log u / du = inf at u = 0 (and at subnormal
  u, which XLA on CPU reads as 0): NaN for every q. Here u = 0 gets 1 at q = 0 (ln_0(u) = u - 1) and the largest
  float32 for q > 0 (the derivative is +inf); a finite u^-q above float32's range saturates the same way.
  """
  u, q = primals
  u_dot, q_dot = tangents
  value = _q_log(u, q)
  log_u = jnp.log(u)
  is_zero = ~(log_u > -jnp.inf)  # u = 0, or a subnormal u read as 0
  safe_log_u = jnp.where(is_zero, 0.0, log_u)
  float_max = jnp.finfo(jnp.float32).max
  d_u = jnp.where(is_zero, jnp.where(q > 0, float_max, 1.0), jnp.minimum(jnp.exp(-q * safe_log_u), float_max))
  _, q_part = jax.jvp(lambda q_: _q_log_of_log(log_u, q_), (q,), (q_dot,))
  return value, d_u * u_dot + q_part


def q_log(u: jax.Array, q) -> jax.Array:
  """The Tsallis q-logarithm ln_q(u) = (u^(1-q) - 1)/(1-q) for u in [0, 1], ln_1 = log (spec 1.2, fact 1).

  Elementwise, float32, exact at q = 1 and continuous around it. Its derivative in u is u^-q, finite everywhere: at
  u = 0 it is 1 for q = 0 and saturates at the largest float32 for q > 0. Prefer `q_log_of_log` when log u is at
  hand: it keeps u below float32's smallest normal exact.
  """
  check_q(q)
  u = jnp.asarray(u, jnp.float32)
  return _q_log(u, jnp.asarray(q, jnp.float32))


def jq_loss(log_p: jax.Array, q) -> jax.Array:
  """The exact J_Q loss: the mean over examples of -ln_q(P), from log P (spec 1.2, eq. 2).

  `log_p` holds log P_theta(y*|x*) per example (any shape; the mean is over all entries). It is the loss of
  tractable models and the reference every estimator is tested against: its gradient is P^-q grad(1 - P)
  = P^(1-q) grad(-log P) (spec 1.4, eq. 5). Finite for P down to 0 when q < 1.
  """
  log_p = jnp.asarray(log_p, jnp.float32)
  if log_p.size == 0:
    raise ValueError("jq_loss got an empty log_p; pass at least one example.")
  return -jnp.mean(q_log_of_log(log_p, q))


def amplification(log_p: jax.Array, q) -> jax.Array:
  """The per-example amplification P^-q = exp(-q log P) of the RL-endpoint gradient (spec 1.4, fact 3)."""
  check_q(q)
  log_p = jnp.asarray(log_p, jnp.float32)
  return jnp.exp(-jnp.asarray(q, jnp.float32) * log_p)
