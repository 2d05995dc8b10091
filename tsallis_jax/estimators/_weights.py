"""Log-space weight algebra shared by GARL and PAFT (spec 2.1-2.3).

All functions take the stop-gradient log weights of one batch, `logw_BxG`, and return per-group or per-sample
coefficients. log w = -inf (a zero weight) is allowed anywhere; a group whose weights are all zero ("zero-success")
gets zero coefficients, and every `where` is written so that the unused branch never sees inf or NaN ("double
where"), so the values and their gradients stay finite.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tsallis_jax.qlog import check_q

__all__ = [
  "validate_pair",
  "log_mean_w",
  "log_mean_w_leave_one_out",
  "garl_coefficients",
  "weight_metrics",
  "log_normalizer_Mq",
]


def validate_pair(logp_z_BxG: jax.Array, logw_BxG: jax.Array, *, min_samples: int = 1) -> None:
  """Raises ValueError on mismatched or non-rank-2 log-prob / log-weight arrays, or too few samples per group."""
  if logp_z_BxG.shape != logw_BxG.shape:
    raise ValueError(f"logp_z_BxG {logp_z_BxG.shape} and logw_BxG {logw_BxG.shape} must have the same shape "
                     "(prompts, samples per prompt).")
  if logp_z_BxG.ndim != 2:
    raise ValueError(f"expected rank-2 (prompts, samples) log-probs, got shape {logp_z_BxG.shape}; add a leading "
                     "prompt axis of size 1 for a single prompt.")
  num_samples = logp_z_BxG.shape[1]
  if num_samples < min_samples:
    raise ValueError(f"need at least {min_samples} samples per prompt, got G={num_samples}; the leave-one-out "
                     "baseline needs G >= 2 (use baseline='none' for G = 1).")


def log_mean_w(logw_BxG: jax.Array) -> jax.Array:
  """log w-bar_M = LSE_m log w_m - log M per group; -inf for a zero-success group (spec 2.1)."""
  num_samples = logw_BxG.shape[1]
  max_B = jnp.max(logw_BxG, axis=1)
  safe_max_B = jnp.where(jnp.isneginf(max_B), 0.0, max_B)
  sum_B = jnp.sum(jnp.exp(logw_BxG - safe_max_B[:, None]), axis=1)
  safe_sum_B = jnp.where(sum_B > 0, sum_B, 1.0)
  return jnp.where(sum_B > 0, safe_max_B + jnp.log(safe_sum_B), -jnp.inf) - np.log(num_samples)


def log_mean_w_leave_one_out(logw_BxG: jax.Array) -> jax.Array:
  """log w-bar_not_m = LSE_{j != m} log w_j - log(M - 1), exact (no cancellation), -inf when the others are 0.

  Computed over a masked BxGxG array, which is cheap for the group sizes of RL (G up to a few hundred).
  """
  num_samples = logw_BxG.shape[1]
  off_diagonal_GxG = ~np.eye(num_samples, dtype=bool)
  others_BxGxG = jnp.where(off_diagonal_GxG[None], logw_BxG[:, None, :], -jnp.inf)
  max_BxG = jnp.max(others_BxGxG, axis=2)
  safe_max_BxG = jnp.where(jnp.isneginf(max_BxG), 0.0, max_BxG)
  sum_BxG = jnp.sum(jnp.exp(others_BxGxG - safe_max_BxG[:, :, None]), axis=2)
  safe_sum_BxG = jnp.where(sum_BxG > 0, sum_BxG, 1.0)
  return jnp.where(sum_BxG > 0, safe_max_BxG + jnp.log(safe_sum_BxG), -jnp.inf) - np.log(num_samples - 1)


def _safe_pow_of_log(log_x: jax.Array, power, *, zero_to_the_zero: float) -> jax.Array:
  """x^power = exp(power log x) with log x = -inf mapped to 0 (power > 0) or `zero_to_the_zero` (power = 0)."""
  is_zero = jnp.isneginf(log_x)
  safe_log_x = jnp.where(is_zero, 0.0, log_x)
  value = jnp.exp(power * safe_log_x)
  return jnp.where(is_zero, jnp.where(power > 0, 0.0, zero_to_the_zero), value)


def log_normalizer_Mq(num_samples: int, q) -> jax.Array:
  """log(1/M^q) = -q log M, the paper's normalisation of Algorithms 1-2 (spec 1.6)."""
  return -jnp.asarray(q, jnp.float32) * np.log(num_samples)


def garl_coefficients(logw_BxG: jax.Array, q, *, baseline: str) -> dict[str, jax.Array]:
  """GARL's per-sample coefficients from stop-gradient log weights (spec 2.2).

  Returns a dict with
    score_BxG: c_m = w_m A - b_m (baseline='rloo', eq. 12) or w_m A (baseline='none', eq. 9), the weight of
      -log p(z_m|x);
    path_BxG: A w_m, the weight of -log w_m (the pathwise term, kept uncentred);
    log_wbar_B, zero_B: log w-bar_M and the zero-success mask.
  A = w-bar^-q and b_m = (w-bar_not_m)^(1-q), with b_m = 1 at q = 1 (0^0 = 1, the paper's convention) and
  0^(1-q) = 0 for q < 1. Zero-success groups get exactly zero coefficients (the convention of spec 2.2).
  """
  check_q(q)
  if baseline not in ("rloo", "none"):
    raise ValueError(f"baseline must be 'rloo' (leave-one-out, eq. 12) or 'none' (plug-in, eq. 9), got "
                     f"{baseline!r}.")
  q = jnp.asarray(q, jnp.float32)
  log_wbar_B = log_mean_w(logw_BxG)
  zero_B = jnp.isneginf(log_wbar_B)
  safe_log_wbar_B = jnp.where(zero_B, 0.0, log_wbar_B)
  # Effective reward w_m / w-bar^q in log space: never overflows, exp(-inf) = 0 for zero weights.
  path_BxG = jnp.exp(logw_BxG - q * safe_log_wbar_B[:, None])
  if baseline == "rloo":
    baseline_BxG = _safe_pow_of_log(log_mean_w_leave_one_out(logw_BxG), 1.0 - q, zero_to_the_zero=1.0)
    score_BxG = path_BxG - baseline_BxG
  else:
    score_BxG = path_BxG
  zero_BxG = jnp.broadcast_to(zero_B[:, None], logw_BxG.shape)
  return {
    "score_BxG": jnp.where(zero_BxG, 0.0, score_BxG),
    "path_BxG": jnp.where(zero_BxG, 0.0, path_BxG),
    "log_wbar_B": log_wbar_B,
    "zero_B": zero_B,
  }


def weight_metrics(logw_BxG: jax.Array, q) -> dict[str, jax.Array]:
  """What a researcher watches (ECOSYSTEM.md names), all finite scalars.

  weight/mean: the batch mean of P-hat = w-bar_M. jq/amp_mean, jq/amp_max: P-hat^-q over groups with a success
  (0 when there is none; saturating at the largest float32); jq/log_amp_mean: the mean of -q log P-hat over the
  same groups. jq/weight_ess: the effective sample size (sum w)^2 / sum w^2, in [1, G], averaged over groups with
  a success. groups/frac_zero_success: the fraction of all-zero groups. jq/max_c_over_Mq: the batch
  mean of the per-group max effective reward w_m / w-bar^q / M^q, in [0, 1] (spec fact 13, the paper's Fig. 3).
  """
  q = jnp.asarray(q, jnp.float32)
  num_samples = logw_BxG.shape[1]
  log_wbar_B = log_mean_w(logw_BxG)
  zero_B = jnp.isneginf(log_wbar_B)
  safe_log_wbar_B = jnp.where(zero_B, 0.0, log_wbar_B)
  has_success_B = (~zero_B).astype(jnp.float32)
  num_success = jnp.maximum(jnp.sum(has_success_B), 1.0)
  # Amplification in log space: P-hat^-q overflows float32 for P-hat below ~1e-38, so the mean is formed with
  # log-sum-exp and both saturate at the largest float32 instead of becoming inf.
  log_amp_B = jnp.where(zero_B, -jnp.inf, -q * safe_log_wbar_B)
  any_success = ~jnp.all(zero_B)
  float_max = jnp.finfo(jnp.float32).max
  saturate = lambda log_x: jnp.where(any_success, jnp.minimum(jnp.exp(jnp.where(any_success, log_x, 0.0)),
                                                              float_max), 0.0)
  amp_mean = saturate(jax.nn.logsumexp(log_amp_B) - jnp.log(num_success))
  amp_max = saturate(jnp.max(log_amp_B))
  log_sum_sq_B = log_mean_w(2.0 * logw_BxG)
  safe_log_sum_sq_B = jnp.where(zero_B, 0.0, log_sum_sq_B)
  ess_B = jnp.where(zero_B, 0.0, num_samples * jnp.exp(2.0 * safe_log_wbar_B - safe_log_sum_sq_B))
  max_logw_B = jnp.max(logw_BxG, axis=1)
  safe_max_logw_B = jnp.where(zero_B, 0.0, max_logw_B)
  max_c_B = jnp.where(
      zero_B, 0.0, jnp.exp(safe_max_logw_B - q * safe_log_wbar_B + log_normalizer_Mq(num_samples, q)))
  return {
    "jq/q": q,
    "weight/mean": jnp.mean(jnp.exp(log_wbar_B)),
    "jq/amp_mean": amp_mean,
    "jq/amp_max": amp_max,
    "jq/log_amp_mean": jnp.sum(jnp.where(zero_B, 0.0, log_amp_B)) / num_success,
    "jq/weight_ess": jnp.sum(ess_B) / num_success,
    "groups/frac_zero_success": jnp.mean(zero_B.astype(jnp.float32)),
    "jq/max_c_over_Mq": jnp.mean(max_c_B),
  }
