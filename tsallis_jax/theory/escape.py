"""Escape times of the J_Q gradient flow on the toy models: closed forms, series, asymptotics and a real ODE solve.

Spec 1.5 (eq. 6, Thms 5.1-5.2, App. C.1 eq. 15) and spec 2.7. Under symmetric initialisation the softmax toy
obeys pdot = (K/(C(K-C))) p^(2-q) (1-p)^2, so the time for P to climb from p0 to delta is

  T_q(p0, delta) = C(K-C)/K * I_q,   I_q = integral_{p0}^{delta} u^(q-2) (1-u)^-2 du,

and the sigmoid model (App. C.1) has T_q = I_q. `escape_time` evaluates I_q in float64 by the closed forms at q = 0
and q = 1 and by the convergent series of spec 2.7 in between; `simulate_escape_time` integrates the flow
d(theta)/dt = -grad jq_loss(log P(theta), q) in logit space with diffrax (Tsit5, PID step control, an event at
P = delta located by Newton's method), the gradient coming from `tsallis_jax.jq_loss`'s own autograd.
"""
from __future__ import annotations

from collections.abc import Callable
import functools
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import scipy.special

from tsallis_jax.qlog import check_q, jq_loss
from tsallis_jax.theory import toys

__all__ = [
  "escape_integral",
  "escape_time",
  "escape_time_asymptotic",
  "sigmoid_escape_time",
  "simulate_escape_time",
  "simulate_sigmoid_escape_time",
  "log_log_slope",
]

# The series is summed until delta^n drops below this (terms are positive, so the tail is this small relative).
_SERIES_TAIL = 1e-19


def _check_q_float(q) -> float:
  check_q(q)
  return float(q)


def _power_difference(exponent: float, p0: float, delta: float) -> float:
  """[u^e / e] from p0 to delta, i.e. (delta^e - p0^e)/e, and log(delta/p0) at e = 0, without cancellation."""
  log_ratio = math.log(delta) - math.log(p0)
  if exponent >= 0.0:  # delta^e (1 - (p0/delta)^e)/e: factor out the larger power so nothing overflows
    return math.exp(exponent * math.log(delta)) * log_ratio * float(scipy.special.exprel(-exponent * log_ratio))
  return math.exp(exponent * math.log(p0)) * log_ratio * float(scipy.special.exprel(exponent * log_ratio))


def _antiderivative_q0(u: float) -> float:
  """F_0(u) = -1/u + 1/(1-u) + 2 ln(u/(1-u)), an antiderivative of u^-2 (1-u)^-2 (spec 2.7)."""
  return -1.0 / u + 1.0 / (1.0 - u) + 2.0 * (math.log(u) - math.log1p(-u))


def _antiderivative_q1(u: float) -> float:
  """F_1(u) = ln(u/(1-u)) + 1/(1-u), an antiderivative of u^-1 (1-u)^-2 (spec 2.7)."""
  return math.log(u) - math.log1p(-u) + 1.0 / (1.0 - u)


def _escape_integral_series(q: float, p0: float, delta: float) -> float:
  """I_q = sum_n (n+1) [u^(n+q-1)/(n+q-1)]_{p0}^{delta} (spec 2.7); all terms are positive, valid for delta < 1."""
  num_terms = int(math.ceil(math.log(_SERIES_TAIL) / math.log(delta))) + 8
  terms = [(n + 1) * _power_difference(n + q - 1.0, p0, delta) for n in range(num_terms)]
  return math.fsum(terms)


def escape_integral(q: float, p0: float, *, delta: float = 0.5) -> float:
  """I_q(p0, delta) = integral_{p0}^{delta} u^(q-2) (1-u)^-2 du in float64 (spec 2.7, App. C.1 eq. 15).

  Closed forms at q = 0 and q = 1, the positive-term series in between (relative error ~1e-15). Raises ValueError
  for q outside [0, 1] or p0 outside (0, delta).
  """
  q = _check_q_float(q)
  toys.check_p0(p0, delta)
  if q == 0.0:
    return _antiderivative_q0(delta) - _antiderivative_q0(p0)
  if q == 1.0:
    return _antiderivative_q1(delta) - _antiderivative_q1(p0)
  return _escape_integral_series(q, p0, delta)


def escape_time(q: float, p0: float, *, num_trajectories: int, num_correct: int = 1, delta: float = 0.5) -> float:
  """Exact continuous-time escape time of the softmax toy from P = p0 to P = delta (spec 2.7).

  T = C(K-C)/K * I_q with K = num_trajectories, C = num_correct. At delta = 1/2 and q = 0 this is
  C(K-C)/K [1/p0 - 1/(1-p0) + 2 ln((1-p0)/p0)]; at q = 1, C(K-C)/K [ln((1-p0)/p0) + (1-2 p0)/(1-p0)].
  Raises ValueError for q outside [0, 1], p0 outside (0, delta), or not 1 <= C < K.
  """
  scale = toys.softmax_toy_score_scale(num_trajectories=num_trajectories, num_correct=num_correct)
  return escape_integral(q, p0, delta=delta) / scale


def sigmoid_escape_time(q: float, p0: float, *, delta: float = 0.5) -> float:
  """Exact escape time of the sigmoid model P = sigmoid(theta): T_q = I_q (spec App. C.1, eq. 15)."""
  return escape_integral(q, p0, delta=delta)


def escape_time_asymptotic(
    q: float, p0: float, *, num_trajectories: int | None = None, num_correct: int = 1) -> float:
  """Leading order of T_q as p0 -> 0 (Thm 5.2, spec 2.7): s p0^-(1-q)/(1-q) for q < 1, s ln(1/p0) at q = 1.

  s = C(K-C)/K for the softmax toy, and s = 1 for the sigmoid model (num_trajectories=None).
  """
  q = _check_q_float(q)
  if not 0.0 < p0 < 1.0:
    raise ValueError(f"p0 must lie in (0, 1), got {p0!r}.")
  scale = 1.0 if num_trajectories is None else 1.0 / toys.softmax_toy_score_scale(
    num_trajectories=num_trajectories, num_correct=num_correct)
  if q == 1.0:
    return scale * -math.log(p0)
  return scale * p0 ** (q - 1.0) / (1.0 - q)


def log_log_slope(x, y) -> float:
  """Least-squares slope of log y against log x (spec fact 6: slope of T_q against 1/p0 tends to 1 - q)."""
  log_x = np.log(np.asarray(x, np.float64))
  log_y = np.log(np.asarray(y, np.float64))
  return float(np.polyfit(log_x, log_y, 1)[0])


def _horizon(q: float, p0: float, delta: float, score_scale_at_delta: float) -> float:
  """An upper bound on the escape time (Thm 5.2's comparison ODE with ||s||^2 >= its minimum), doubled.

  Only the integration horizon: the escape time itself is found by the solver's event.
  """
  upper = (math.log(delta / p0) if q == 1.0 else _power_difference(q - 1.0, p0, delta)) / score_scale_at_delta
  return 2.0 * upper + 1.0


@functools.partial(jax.jit, static_argnames=("log_success_fn", "rtol", "atol", "max_steps"))
def _flow_escape(log_success_fn: Callable[[jax.Array], jax.Array], theta0, q, log_delta, horizon, *,
                 rtol: float, atol: float, max_steps: int):
  """Integrates theta' = -grad jq_loss(log P(theta), q) until log P = log delta; returns (time, log P, steps)."""

  def vector_field(t, theta, args):
    del t, args
    return -jax.grad(lambda th: jq_loss(log_success_fn(th)[None], q))(theta)

  def reached_delta(t, y, args, **kwargs):
    del t, args, kwargs
    return log_success_fn(y) - log_delta

  sol = diffrax.diffeqsolve(
    diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0, t1=horizon, dt0=None, y0=theta0,
    stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
    event=diffrax.Event(reached_delta, root_finder=optx.Newton(rtol=1e-10, atol=1e-10)),
    max_steps=max_steps, throw=False)
  return sol.ts[-1], log_success_fn(sol.ys[-1]), sol.stats["num_steps"], sol.result == diffrax.RESULTS.event_occurred


@functools.lru_cache(maxsize=None)
def _softmax_log_success_fn(num_correct: int) -> Callable[[jax.Array], jax.Array]:
  """One function object per C, so the jitted flow compiles once per (C, K) rather than once per call."""
  return functools.partial(toys.softmax_toy_log_success, num_correct=num_correct)


def _simulate(log_success_fn, theta0: np.ndarray, q: float, p0: float, delta: float, score_scale_at_delta: float,
              rtol: float, atol: float, max_steps: int) -> float:
  with jax.enable_x64(True):
    time, log_p_end, num_steps, ok = _flow_escape(
      log_success_fn, jnp.asarray(theta0, jnp.float64), jnp.float64(q), jnp.float64(math.log(delta)),
      jnp.float64(_horizon(q, p0, delta, score_scale_at_delta)), rtol=rtol, atol=atol, max_steps=max_steps)
    time, log_p_end, num_steps, ok = float(time), float(log_p_end), int(num_steps), bool(ok)
  if not ok or abs(log_p_end - math.log(delta)) > 1e-5:
    raise RuntimeError(
      f"the gradient flow did not reach P = delta = {delta} (q={q}, p0={p0}): solver ok={ok} after {num_steps} "
      f"steps, log P at the end {log_p_end:.6g}; raise max_steps or loosen rtol.")
  return time


def simulate_escape_time(q: float, p0: float, *, num_trajectories: int, num_correct: int = 1, delta: float = 0.5,
                         rtol: float = 1e-8, atol: float = 1e-8, max_steps: int = 100_000) -> float:
  """Escape time of the softmax toy measured by integrating its gradient flow (spec 1.5 eq. 6, spec 2.7).

  Starts at `softmax_toy_init(p0)` (symmetric), integrates d(theta)/dt = -grad_theta jq_loss(log P(theta), q) in
  float64 logit space (jq_loss itself evaluates in float32) and returns the time at which P first reaches delta.
  Agrees with `escape_time` to better than 1e-3 relative for p0 >= 1e-6 (measured: 3e-4 at q = 0, p0 = 1e-6, and
  <= 3e-5 elsewhere on the grid of experiments.escape_time); the limit is the float32 gradient of jq_loss at tiny P,
  whose relative error grows like 1e-8 / P^(1-q). Same argument checks as `escape_time`.
  """
  q = _check_q_float(q)
  toys.check_p0(p0, delta)
  theta0_K = toys.softmax_toy_init(p0, num_trajectories=num_trajectories, num_correct=num_correct)
  scale = toys.softmax_toy_score_scale(num_trajectories=num_trajectories, num_correct=num_correct)
  log_success_fn = _softmax_log_success_fn(num_correct)
  return _simulate(log_success_fn, theta0_K, q, p0, delta, scale * (1.0 - delta) ** 2, rtol, atol, max_steps)


def simulate_sigmoid_escape_time(q: float, p0: float, *, delta: float = 0.5, rtol: float = 1e-8,
                                 atol: float = 1e-8, max_steps: int = 100_000) -> float:
  """Escape time of the sigmoid model P = sigmoid(theta) from its gradient flow (spec App. C.1)."""
  q = _check_q_float(q)
  toys.check_p0(p0, delta)
  return _simulate(toys.sigmoid_toy_log_success, toys.sigmoid_toy_init(p0), q, p0, delta, (1.0 - delta) ** 2,
                   rtol, atol, max_steps)
