"""Gradient-Amplified RL (GARL): spec 1.6 eq. 9 (plug-in) and eq. 12 / Algorithm 1 (leave-one-out), spec 2.2.

The surrogate loss (sg = stop-gradient, A = w-bar_M^-q, c_m = w_m A - b_m, b_m = (w-bar_not_m)^(1-q) or 0)

  L_GARL = (1/M^q) mean_B (1/M) sum_m [ -sg(c_m) log p(z_m|x) - sg(A w_m) log w_m ]

has the estimator as its autograd gradient, pathwise term included (grad w_m = w_m grad log w_m). Its value is not
the J_Q loss; use `jq_loss` for that on tractable models.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tsallis_jax.estimators import _weights
from tsallis_jax.estimators.types import as_pair
from tsallis_jax.qlog import check_q

__all__ = ["garl_loss", "garl_grad"]


def garl_loss(
    logp_z_BxG: jax.Array,
    logw_BxG: jax.Array,
    *,
    q,
    baseline: str = "rloo",
    normalize_by_Mq: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GARL surrogate loss and its metrics; `jax.grad` of the loss is the GARL gradient estimate.

  Args:
    logp_z_BxG: log p_theta(z_m|x*) of the M = G sampled rationales of each of B prompts, differentiable.
    logw_BxG: log w_m = log p_theta(y*|x*, z_m), differentiable (the pathwise term); a 0/1 verifier gives
      {0, -inf} with no dependence on params. -inf is allowed; if log w comes from params, make sure its own
      derivative is finite where it is -inf (the estimator sends a zero cotangent there).
    q: commitment in [0, 1]; a Python float is validated, a traced scalar (a schedule inside jit) is not.
    baseline: 'rloo' (eq. 12, Algorithm 1: the score term is centred by (w-bar_not_m)^(1-q), which is 1 at q = 1)
      or 'none' (the plug-in eq. 9). Both have the same expectation (Prop D.1), see the zero-success note.
    normalize_by_Mq: multiply by 1/M^q as Algorithms 1-2 do (the default; a q-dependent learning-rate rescaling
      that keeps the effective reward in [0, 1]). False gives eq. 9 / eq. 12 as written, whose expectation
      targets grad J_Q itself.

  Returns:
    (loss, aux): a float32 scalar and a dict of finite float32 scalars (see `_weights.weight_metrics`).

  Zero-success groups (all w_m = 0, binary rewards only) contribute an exactly zero gradient for every q and both
  baselines (spec 2.2). Consequence at q = 1 with baseline='rloo': the baseline b_m = 1 then depends on the other
  samples having a success, so E[RLOO] = (1 - (1-P)^(M-1)) grad l_1 instead of the plug-in's
  (1 - (1-P)^M) grad l_1; for q < 1, and for strictly positive weights, E[RLOO] = E[plug-in] exactly.
  """
  check_q(q)
  logp_z_BxG = jnp.asarray(logp_z_BxG, jnp.float32)
  logw_BxG = jnp.asarray(logw_BxG, jnp.float32)
  _weights.validate_pair(logp_z_BxG, logw_BxG, min_samples=2 if baseline == "rloo" else 1)
  num_samples = logp_z_BxG.shape[1]
  coef = _weights.garl_coefficients(jax.lax.stop_gradient(logw_BxG), q, baseline=baseline)
  score_BxG = jax.lax.stop_gradient(coef["score_BxG"])
  path_BxG = jax.lax.stop_gradient(coef["path_BxG"])
  safe_logw_BxG = jnp.where(jnp.isneginf(logw_BxG), 0.0, logw_BxG)  # zero weights have zero path coefficient
  per_sample_BxG = -score_BxG * logp_z_BxG - path_BxG * safe_logw_BxG
  scale = jnp.exp(_weights.log_normalizer_Mq(num_samples, q)) if normalize_by_Mq else jnp.float32(1.0)
  loss = scale * jnp.mean(per_sample_BxG)
  aux = _weights.weight_metrics(jax.lax.stop_gradient(logw_BxG), q)
  return loss, aux


def garl_grad(
    logprob_fn: Callable[[Any, Any], Any],
    params: Any,
    batch: Any,
    *,
    q,
    baseline: str = "rloo",
    normalize_by_Mq: bool = True,
) -> tuple[Any, dict[str, jax.Array]]:
  """The GARL gradient of the loss (descent direction = -grads), averaged over the B prompts (spec eq. 9 / 12).

  `logprob_fn(params, batch)` returns `(logp_z_BxG, logw_BxG)` or a `SequenceLogProbs` with answer tokens (reduced
  by masked sums). E[grads] -> grad J_Q as G grows (times 1/M^q when `normalize_by_Mq`). See `garl_loss` for the
  arguments and the zero-success convention; aux additionally holds `loss`.
  """
  check_q(q)

  def loss_fn(p):
    logp_z_BxG, logw_BxG = as_pair(logprob_fn(p, batch))
    return garl_loss(logp_z_BxG, logw_BxG, q=q, baseline=baseline, normalize_by_Mq=normalize_by_Mq)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, {**aux, "loss": loss}
