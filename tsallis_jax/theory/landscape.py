"""The loss landscape of J_Q: the escort minimiser (Thm 3.1) and the dispersion penalty (Prop B.1).

Spec 1.3 and acceptance facts 4-5. Objectives are evaluated with `tsallis_jax.q_log_of_log` / `jq_loss`, so the
closed forms here can be tested against direct numerical minimisation of the same code the estimators target.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tsallis_jax.qlog import check_q, jq_loss, q_log_of_log

__all__ = ["escort_minimiser", "categorical_qloss", "dispersion_penalty", "dispersion_second_order"]


def _check_alpha(alpha_N) -> np.ndarray:
  alpha_N = np.asarray(alpha_N, np.float64)
  if alpha_N.ndim != 1 or alpha_N.size < 2:
    raise ValueError(f"alpha must be a 1-D array of at least 2 frequencies, got shape {alpha_N.shape}.")
  if not np.all(np.isfinite(alpha_N)) or np.any(alpha_N <= 0):
    raise ValueError(f"alpha must be finite and strictly positive (Thm 3.1 assumes alpha_j > 0), got {alpha_N}; "
                     "drop outputs that never occur.")
  return alpha_N


def escort_minimiser(alpha_N, q: float) -> np.ndarray:
  """The unique minimiser of sum_j alpha_j (-ln_q theta_j) on the simplex: the escort alpha^(1/q) / sum (Thm 3.1).

  Computed as softmax(log alpha / q) in float64, so tiny entries are exact. alpha need not be normalised (the
  minimiser is scale-invariant). q = 1 gives alpha / sum alpha (Cor B.2); q = 0 returns the limit q -> 0+, uniform
  over the argmax of alpha (the objective is then linear and any point of that face is a minimiser).
  """
  check_q(q)
  alpha_N = _check_alpha(alpha_N)
  log_alpha_N = np.log(alpha_N)
  if q == 0:
    is_mode_N = log_alpha_N == log_alpha_N.max()
    return is_mode_N / is_mode_N.sum()
  scaled_N = log_alpha_N / float(q)
  scaled_N -= scaled_N.max()
  return np.exp(scaled_N) / np.exp(scaled_N).sum()


def categorical_qloss(log_theta_N: jax.Array, alpha_N: jax.Array, q) -> jax.Array:
  """sum_j alpha_j (-ln_q theta_j) from log theta: the categorical model's J_Q objective (spec 1.3, Thm 3.1)."""
  alpha_N = jnp.asarray(alpha_N, jnp.float32)
  return -jnp.sum(alpha_N * q_log_of_log(log_theta_N, q))


def dispersion_penalty(log_p_D: jax.Array, q) -> jax.Array:
  """J_Q - (-ln_q P-bar) >= 0 over a dataset of success probabilities (Prop B.1, acceptance fact 5).

  J_Q is `jq_loss(log_p_D, q)`; P-bar = mean_D P is formed in log space (log-sum-exp). Zero iff P is constant over
  D (for q > 0); identically 0 at q = 0, where J_0 depends on P-bar only.
  """
  log_p_D = jnp.asarray(log_p_D, jnp.float32)
  if log_p_D.ndim != 1 or log_p_D.size < 1:
    raise ValueError(f"log_p_D must be a 1-D array of per-example log P, got shape {log_p_D.shape}.")
  log_p_bar = jax.nn.logsumexp(log_p_D) - jnp.log(jnp.float32(log_p_D.size))
  return jq_loss(log_p_D, q) - jq_loss(log_p_bar[None], q)


def dispersion_second_order(log_p_D: jax.Array, q) -> jax.Array:
  """The second-order excess (q/2) P-bar^(-q-1) Var_D(P) of Prop B.1 (population variance)."""
  check_q(q)
  p_D = jnp.exp(jnp.asarray(log_p_D, jnp.float32))
  p_bar = jnp.mean(p_D)
  return 0.5 * q * p_bar ** (-q - 1.0) * jnp.var(p_D)
