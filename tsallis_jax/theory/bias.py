"""The finite-M bias of GARL and PAFT measured on the toys, against the exact and delta-method predictions.

Spec 1.6 (Thm 6.1, Props D.1-D.3), spec 2.4 and acceptance facts 8-9. The estimators are the core's `garl_grad` /
`paft_grad` with `normalize_by_Mq=False` (so that their expectation targets grad J_Q), applied to the toys of
`toys.py`; the truth is the autograd gradient of `jq_loss` at the toy's exact log P.

Binary rewards: E[estimate] = rho(q, M, P) grad l_q exactly, rho = E[(S/M)^(1-q)]/P^(1-q), S ~ Bin(M, P), and
rho ~ 1 - q(1-q)(1-P)/(2MP) (delta method). Likelihood weights: M (E[estimate] - grad l_q) ->
(q/P^(q+1)) [((q+1)/2) grad l_1 Var(w) - Cov(g, w)] (Thm 6.1), evaluated exactly by enumerating the K trajectories.

Measurement uses a control variate with the same samples: bias = E[g_q - P^-q g_0], where g_0 (the same estimator at
q = 0) is exactly unbiased for grad l_0 = P^q grad l_q (Prop D.2, RLOO and PAFT at q = 0 included), so the
difference has the estimator's bias and a far smaller variance than g_q alone.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.stats

from tsallis_jax.estimators import garl_grad, paft_grad
from tsallis_jax.qlog import check_q, jq_loss
from tsallis_jax.theory import toys

__all__ = [
  "ESTIMATORS",
  "binary_shrinkage",
  "delta_method_shrinkage",
  "likelihood_bias_coefficient",
  "measure_bias",
]

ESTIMATORS = ("garl_plugin", "garl_rloo", "paft")


def _check_mp(num_samples: int, p: float) -> None:
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples (M) must be a positive int, got {num_samples!r}.")
  if not 0.0 < p <= 1.0:
    raise ValueError(f"P must lie in (0, 1], got {p!r}.")


def binary_shrinkage(q: float, num_samples: int, p: float) -> float:
  """rho(q, M, P) = E[(S/M)^(1-q)] / P^(1-q), S ~ Bin(M, P), zero-success groups contributing 0 (spec 2.4).

  At q = 1 this is 1 - (1 - P)^M (the plug-in; GARL-RLOO at q = 1 has 1 - (1 - P)^(M-1), see `garl_loss`).
  """
  check_q(q)
  _check_mp(num_samples, p)
  successes_S = np.arange(1, num_samples + 1)
  pmf_S = scipy.stats.binom.pmf(successes_S, num_samples, p)
  return float(np.sum(pmf_S * (successes_S / num_samples) ** (1.0 - q)) / p ** (1.0 - q))


def delta_method_shrinkage(q: float, num_samples: int, p: float) -> float:
  """The delta-method rho ~ 1 - q(1-q)(1-P)/(2MP) (spec 2.4); fails when MP <~ 1."""
  check_q(q)
  _check_mp(num_samples, p)
  return 1.0 - q * (1.0 - q) * (1.0 - p) / (2.0 * num_samples * p)


def _flat(tree) -> jax.Array:
  return jax.flatten_util.ravel_pytree(tree)[0]


def likelihood_bias_coefficient(params: dict, q: float) -> np.ndarray:
  """The Thm 6.1 leading coefficient (q/P^(q+1)) [((q+1)/2) grad l_1 Var(w) - Cov(g, w)] of the likelihood toy.

  Exact moments over the K trajectories: g_z = -w_z grad log p(z, y*) = -w_z grad [log pi_z + log w_z]. Returned
  flattened (params raveled, as `jax.flatten_util.ravel_pytree` orders them); bias ~ coefficient / M.
  """
  check_q(q)
  flat_params, unravel = jax.flatten_util.ravel_pytree(params)

  def log_joint_K(flat):
    p = unravel(flat)
    return jax.nn.log_softmax(p["logits_K"]) + jax.nn.log_sigmoid(p["answer_logits_K"])

  def log_w_K(flat):
    return jax.nn.log_sigmoid(unravel(flat)["answer_logits_K"])

  pi_K = jax.nn.softmax(params["logits_K"])
  w_K = jnp.exp(log_w_K(flat_params))
  score_KxD = jax.jacobian(log_joint_K)(flat_params)
  g_KxD = -w_K[:, None] * score_KxD
  p = jnp.sum(pi_K * w_K)
  var_w = jnp.sum(pi_K * w_K ** 2) - p ** 2
  mean_g_D = jnp.einsum("k,kd->d", pi_K, g_KxD)
  cov_gw_D = jnp.einsum("k,kd->d", pi_K * w_K, g_KxD) - mean_g_D * p
  grad_l1_D = jax.grad(lambda f: -jax.nn.logsumexp(log_joint_K(f)))(flat_params)
  return np.asarray(q / p ** (q + 1.0) * ((q + 1.0) / 2.0 * grad_l1_D * var_w - cov_gw_D))


@functools.partial(jax.jit, static_argnames=("estimator", "toy", "num_samples", "batch_size", "num_chunks"))
def _bias_chunks(params, correct_K, q, key, *, estimator, toy, num_samples, batch_size, num_chunks):
  """Per chunk of `batch_size` replicates: the mean of g_q - P^-q g_0 on shared samples, flattened."""
  logprob_fn = toys.binary_toy_logprob_fn if toy == "binary" else toys.likelihood_toy_logprob_fn
  log_p = (toys.binary_toy_log_success(params, correct_K) if toy == "binary"
           else toys.likelihood_toy_log_success(params))

  def estimate(batch, resample_key, q_value):
    if estimator == "paft":
      grads, _ = paft_grad(logprob_fn, params, batch, resample_key, q=q_value, normalize_by_Mq=False)
    else:
      baseline = "rloo" if estimator == "garl_rloo" else "none"
      grads, _ = garl_grad(logprob_fn, params, batch, q=q_value, baseline=baseline, normalize_by_Mq=False)
    return _flat(grads)

  def one_chunk(chunk_key):
    sample_key, resample_key = jax.random.split(chunk_key)
    z_BxG = jax.random.categorical(sample_key, params["logits_K"], shape=(batch_size, num_samples))
    batch = {"z_BxG": z_BxG, "correct_K": correct_K}
    return estimate(batch, resample_key, q) - jnp.exp(-q * log_p) * estimate(batch, resample_key, 0.0)

  return jax.lax.map(one_chunk, jax.random.split(key, num_chunks))


def measure_bias(estimator: str, q: float, num_samples: int, *, params: dict, toy: str = "binary",
                 correct_K=None, key: jax.Array, num_replicates: int = 100_000, num_chunks: int = 50) -> dict:
  """Monte Carlo bias of one estimator at (q, M) on a toy, projected on the true gradient grad l_q.

  Args:
    estimator: 'garl_plugin', 'garl_rloo' or 'paft' (K = M resamples).
    params, toy, correct_K: `toys.binary_toy_params(...)` with toy='binary' and the boolean mask of correct
      trajectories, or `toys.likelihood_toy_init(...)` with toy='likelihood'.
    num_replicates: groups of M samples in total, split in `num_chunks` chunks for the standard error.

  Returns:
    dict with P, the true gradient norm, bias_D (the mean bias vector) and its standard error se_D, rho (1 plus
    the bias's component along grad l_q, relative) with its standard error, and perp_rel (the norm of the bias
    orthogonal to grad l_q, relative to |grad l_q|).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  if toy not in ("binary", "likelihood"):
    raise ValueError(f"toy must be 'binary' or 'likelihood', got {toy!r}.")
  check_q(q)
  _check_mp(num_samples, 0.5)
  if toy == "binary" and correct_K is None:
    raise ValueError("the binary toy needs correct_K, the boolean mask of correct trajectories.")
  num_trajectories = params["logits_K"].shape[0]
  correct_K = jnp.zeros(num_trajectories, bool) if correct_K is None else jnp.asarray(correct_K, bool)
  batch_size = max(1, num_replicates // num_chunks)
  chunks_CxD = np.asarray(_bias_chunks(params, correct_K, jnp.float32(q), key, estimator=estimator, toy=toy,
                                       num_samples=num_samples, batch_size=batch_size, num_chunks=num_chunks),
                          np.float64)
  log_p_fn = ((lambda p: toys.binary_toy_log_success(p, correct_K)) if toy == "binary"
              else toys.likelihood_toy_log_success)
  true_D = np.asarray(_flat(jax.grad(lambda p: jq_loss(log_p_fn(p)[None], q))(params)), np.float64)
  bias_D = chunks_CxD.mean(axis=0)
  se_D = chunks_CxD.std(axis=0, ddof=1) / math.sqrt(num_chunks)
  norm2 = float(true_D @ true_D)
  along_C = chunks_CxD @ true_D / norm2
  perp_D = bias_D - (bias_D @ true_D / norm2) * true_D
  return dict(P=float(jnp.exp(log_p_fn(params))), grad_norm=math.sqrt(norm2), bias_D=bias_D, se_D=se_D,
              true_grad_D=true_D, rho=1.0 + float(along_C.mean()),
              rho_se=float(along_C.std(ddof=1) / math.sqrt(num_chunks)),
              perp_rel=float(np.linalg.norm(perp_D) / math.sqrt(norm2)))
