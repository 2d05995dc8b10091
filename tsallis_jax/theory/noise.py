"""The label-noise toy of Prop C.2 with the constant-score ODE of spec 2.8.

Two labels, noisy targets (1 - eps, eps), contamination p~ = 1 - p. The objective is
J(p~) = (1 - eps) l_q(1 - p~) + eps l_q(p~), evaluated with `jq_loss`, and the flow with constant score norm c is

  dp~/dt = -dJ/dp~ (1 - p~)^2 c^2 = [eps p~^-q - (1 - eps)(1 - p~)^-q] (1 - p~)^2 c^2   (spec eq. 16, 2.8).

Its stable equilibrium is the escort of order 1/q of (1 - eps, eps): p~* = r/(1 + r), r = (eps/(1 - eps))^(1/q)
(exact, spec 2.8); from p~(0) = 0+ the time to reach eta << p~* is ~ eta^(q+1)/((q+1) eps c^2) (eq. 18); at q = 0
the contamination only decreases, so T = inf. `simulate_*` integrate the flow with diffrax through jq_loss's own
autograd; `noise_time_to_contamination` is the quadrature reference of the same ODE.
"""
from __future__ import annotations

import functools
import math
import numbers

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import scipy.integrate
import scipy.optimize

from tsallis_jax.qlog import check_q, jq_loss

__all__ = [
  "noise_objective",
  "noise_drift",
  "noise_equilibrium",
  "noise_equilibrium_numerical",
  "noise_time_asymptotic",
  "noise_time_to_contamination",
  "simulate_noise_time",
  "simulate_noise_flow",
  "noise_time_scale",
]


def _check(q, epsilon, score_norm=1.0) -> tuple[float, float]:
  check_q(q)
  if not (isinstance(epsilon, numbers.Real) and 0.0 < epsilon < 0.5):
    raise ValueError(f"epsilon (the label-noise rate) must lie in (0, 1/2), got {epsilon!r} (Prop C.2).")
  if not (isinstance(score_norm, numbers.Real) and score_norm > 0 and math.isfinite(score_norm)):
    raise ValueError(f"score_norm must be a positive finite number, got {score_norm!r}.")
  return float(q), float(epsilon)


def _check_level(name: str, value: float, upper: float) -> None:
  if not (isinstance(value, numbers.Real) and 0.0 < value < upper):
    raise ValueError(f"{name} must lie in (0, {upper:.6g}), got {value!r}.")


def noise_objective(log_contamination: jax.Array, q, epsilon: float) -> jax.Array:
  """J(p~) = (1 - eps) jq_loss(log(1 - p~)) + eps jq_loss(log p~), from log p~ (Prop C.2)."""
  log_contamination = jnp.asarray(log_contamination)
  log_clean = jnp.log1p(-jnp.exp(log_contamination))
  return (1.0 - epsilon) * jq_loss(log_clean[None], q) + epsilon * jq_loss(log_contamination[None], q)


def _log_drift_rate(log_contamination, q, epsilon, score_norm):
  """d(log p~)/dt = -(dJ/d log p~) (1 - p~)^2 c^2 / p~^2, the flow written for y = log p~."""
  grad_y = jax.grad(noise_objective)(log_contamination, q, epsilon)
  contamination = jnp.exp(log_contamination)
  return -grad_y * (1.0 - contamination) ** 2 * score_norm ** 2 / contamination ** 2


def noise_drift(contamination, q, epsilon: float, *, score_norm: float = 1.0) -> np.ndarray:
  """dp~/dt at p~ by autograd of `noise_objective` (spec eq. 16 with ||s|| = c), as float64 numpy."""
  q, epsilon = _check(q, epsilon, score_norm)
  with jax.enable_x64(True):
    log_c = jnp.log(jnp.asarray(contamination, jnp.float64))
    rate = jax.vmap(lambda y: _log_drift_rate(y, q, epsilon, score_norm))(jnp.atleast_1d(log_c))
    return np.asarray(rate * jnp.exp(jnp.atleast_1d(log_c))).reshape(np.shape(contamination))


def noise_equilibrium(q: float, epsilon: float) -> float:
  """The exact stable equilibrium p~* = r/(1 + r), r = (eps/(1 - eps))^(1/q) (spec 2.8); 0 at q = 0."""
  q, epsilon = _check(q, epsilon)
  if q == 0.0:
    return 0.0
  log_r = (math.log(epsilon) - math.log1p(-epsilon)) / q
  return math.exp(log_r - math.log1p(math.exp(log_r)))


@jax.jit
def _batched_log_drift_rate(log_contamination_Y, q, epsilon):
  return jax.vmap(lambda y: _log_drift_rate(y, q, epsilon, 1.0))(log_contamination_Y)


def noise_equilibrium_numerical(q: float, epsilon: float, *, lowest: float = 1e-12) -> float:
  """The stable zero of the autograd drift: the largest sign change from + to - on [lowest, 1/2] (q > 0).

  A geometric scan brackets it and Brent's method in log p~ refines it. The scan starts from 1/2 and stops at the
  first bracket, so float32 round-off of the drift at tiny p~ (where its terms are ~1e-9) cannot move the answer.
  """
  q, epsilon = _check(q, epsilon)
  if q == 0.0:
    raise ValueError("at q = 0 the drift is negative on (0, 1/2): there is no interior equilibrium (p~* = 0).")
  with jax.enable_x64(True):
    rate = lambda y_Y: _batched_log_drift_rate(y_Y, jnp.float64(q), jnp.float64(epsilon))
    grid_Y = np.linspace(math.log(0.5), math.log(lowest), 400)
    positive_Y = np.asarray(rate(jnp.asarray(grid_Y))) > 0
    if not positive_Y.any():
      raise RuntimeError(f"the drift is not positive anywhere on [{lowest}, 1/2] (q={q}, epsilon={epsilon}).")
    first = int(np.argmax(positive_Y))
    scalar_rate = lambda y: float(rate(jnp.asarray([y]))[0])
    log_root = scipy.optimize.brentq(scalar_rate, grid_Y[first], grid_Y[first - 1], xtol=1e-13, rtol=1e-13)
  return math.exp(log_root)


def noise_time_asymptotic(q: float, eta: float, *, epsilon: float, score_norm: float = 1.0) -> float:
  """Leading order eta^(q+1)/((q+1) eps c^2) of the time to reach contamination eta from 0+ (spec eq. 18, 2.8)."""
  q, epsilon = _check(q, epsilon, score_norm)
  return eta ** (q + 1.0) / ((q + 1.0) * epsilon * score_norm ** 2)


def _drift_closed_form(contamination: float, q: float, epsilon: float, score_norm: float) -> float:
  return ((epsilon * contamination ** -q - (1.0 - epsilon) * (1.0 - contamination) ** -q)
          * (1.0 - contamination) ** 2 * score_norm ** 2)


def noise_time_to_contamination(q: float, eta: float, *, epsilon: float, score_norm: float = 1.0,
                                contamination0: float = 0.0) -> float:
  """Time for p~ to climb from contamination0 (default 0+) to eta: integral dp~ / drift, by quadrature (eq. 16).

  Returns inf when eta is at or above the equilibrium p~*(q) (never reached) and at q = 0 (T_0 = inf).
  """
  q, epsilon = _check(q, epsilon, score_norm)
  _check_level("eta", eta, 1.0)
  if not 0.0 <= contamination0 < eta:
    raise ValueError(f"contamination0 must lie in [0, eta) = [0, {eta}), got {contamination0!r}.")
  if q == 0.0 or eta >= noise_equilibrium(q, epsilon):
    return math.inf
  integrand = lambda c: 1.0 / _drift_closed_form(c, q, epsilon, score_norm)
  edges = [contamination0] + [e for e in np.geomspace(max(contamination0, 1e-3 * eta), eta, 8)
                              if e > contamination0]
  return math.fsum(scipy.integrate.quad(integrand, a, b, epsabs=0.0, epsrel=1e-11, limit=200)[0]
                   for a, b in zip(edges[:-1], edges[1:]))


@functools.partial(jax.jit, static_argnames=("rtol", "max_steps"))
def _noise_solve(log_c0, q, epsilon, score_norm, t_end, save_ts, log_target, *, rtol: float, max_steps: int):
  """Tsit5 with PID control and an event at log_target, in y = log p~.

  The flow is stiff near p~* (relaxation rate ~ q eps p~*^(-q-1) c^2), so horizons are kept to a few natural times
  (`noise_time_scale`); implicit solvers stall on the float32 round-off of jq_loss's gradient near p~*.
  """
  def vector_field(t, y, args):
    del t, args
    return _log_drift_rate(y, q, epsilon, score_norm)

  def reached_target(t, y, args, **kwargs):
    del t, args, kwargs
    return y - log_target

  sol = diffrax.diffeqsolve(
    diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0, t1=t_end, dt0=None, y0=log_c0,
    stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol),
    saveat=diffrax.SaveAt(ts=save_ts, t1=True),
    event=diffrax.Event(reached_target, root_finder=optx.Newton(rtol=1e-10, atol=1e-10)),
    max_steps=max_steps, throw=False)
  return sol.ts, sol.ys, sol.result == diffrax.RESULTS.event_occurred


def simulate_noise_time(q: float, eta: float, *, epsilon: float, score_norm: float = 1.0,
                        contamination0: float | None = None, rtol: float = 1e-8,
                        max_steps: int = 100_000) -> float:
  """Time for the autograd flow to take p~ from contamination0 to eta (diffrax, event at p~ = eta).

  contamination0 defaults to 1e-3 eta (the time spent below it, ~1e-3^(q+1) of the total, is left out; lower
  starts meet jq_loss's float32 round-off, ~1e-9 on the drift's terms). Returns inf when eta is not below the
  equilibrium (and at q = 0).
  """
  q, epsilon = _check(q, epsilon, score_norm)
  _check_level("eta", eta, 1.0)
  contamination0 = 1e-3 * eta if contamination0 is None else contamination0
  _check_level("contamination0", contamination0, eta)
  if q == 0.0 or eta >= noise_equilibrium(q, epsilon):
    return math.inf
  horizon = 1e3 * noise_time_to_contamination(q, eta, epsilon=epsilon, score_norm=score_norm) + 1.0
  with jax.enable_x64(True):
    ts, _, hit = _noise_solve(jnp.float64(math.log(contamination0)), jnp.float64(q), jnp.float64(epsilon),
                              jnp.float64(score_norm), jnp.float64(horizon), jnp.zeros(1), jnp.float64(math.log(eta)),
                              rtol=rtol, max_steps=max_steps)
    time, hit = float(ts[-1]), bool(hit)
  if not hit:
    raise RuntimeError(f"the noise flow did not reach eta={eta} (q={q}, epsilon={epsilon}); raise max_steps.")
  return time


def noise_time_scale(q: float, *, epsilon: float, score_norm: float = 1.0) -> float:
  """The natural time of the noise flow, tau = p~*^(q+1)/((q+1) eps c^2): eq. 18's time to reach p~* (q > 0)."""
  q, epsilon = _check(q, epsilon, score_norm)
  if q == 0.0:
    raise ValueError("at q = 0 there is no equilibrium above 0 and no natural time; pass t_end explicitly.")
  return noise_time_asymptotic(q, noise_equilibrium(q, epsilon), epsilon=epsilon, score_norm=score_norm)


def simulate_noise_flow(q: float, *, epsilon: float, t_end: float | None = None, num_points: int = 50,
                        score_norm: float = 1.0, contamination0: float = 1e-6, rtol: float = 1e-6,
                        log_spaced: bool = False, max_steps: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
  """The contamination path p~(t) of the autograd flow on a grid of `num_points` times in [0, t_end].

  t_end defaults to 100 natural times (`noise_time_scale`), long enough to settle at p~*. The grid is uniform, or
  0 followed by log-spaced times from 1e-7 t_end when `log_spaced` (for log-time plots). Returns (times_T,
  contamination_T) as float64 numpy. At q = 0 the path decreases monotonically (spec fact 16) and reaches 0 in
  finite time; pass t_end below that.
  """
  q, epsilon = _check(q, epsilon, score_norm)
  _check_level("contamination0", contamination0, 0.5)
  if t_end is None:
    t_end = 100.0 * noise_time_scale(q, epsilon=epsilon, score_norm=score_norm)
  if not t_end > 0:
    raise ValueError(f"t_end must be positive, got {t_end!r}.")
  with jax.enable_x64(True):
    if log_spaced:
      log_ts = jnp.geomspace(1e-7 * t_end, t_end, num_points - 1, dtype=jnp.float64)
      save_ts = jnp.concatenate([jnp.zeros(1), jnp.minimum(log_ts, t_end)])  # geomspace may overshoot by an ulp
    else:
      save_ts = jnp.linspace(0.0, t_end, num_points, dtype=jnp.float64)
    ts, ys, _ = _noise_solve(jnp.float64(math.log(contamination0)), jnp.float64(q), jnp.float64(epsilon),
                             jnp.float64(score_norm), jnp.float64(t_end), save_ts,
                             jnp.float64(-jnp.inf), rtol=rtol, max_steps=max_steps)
    times_T, contamination_T = np.asarray(ts[:num_points]), np.exp(np.asarray(ys[:num_points]))
  if not np.all(np.isfinite(contamination_T)):
    raise RuntimeError(f"the noise flow failed before t_end={t_end} (q={q}, epsilon={epsilon}); shorten t_end "
                       "(the flow is stiff at small q) or raise max_steps.")
  return times_T, contamination_T
