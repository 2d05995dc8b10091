"""The GRPO baseline with the options users know from TRL's GRPOTrainer (spec 2.6, fact 15).

Per prompt, advantages A_m = (r_m - mean_g r) / scale are applied to every rationale token; the per-token loss is the
PPO-clipped -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A), rho_t = pi_theta / pi_old, plus beta times
the k3 estimate of KL(pi_theta || pi_ref), exp(ref - logp) - (ref - logp) - 1. On-policy (no old log-probs) rho = 1
with the gradient of log pi.

Options (TRL's GRPOConfig names and semantics; TRL 1.x defaults are scale_rewards='group' and loss_type='dapo',
trl/trainer/grpo_config.py; `grpo_loss` defaults to loss_type='grpo', and so does the trainer, `TrainConfig`):
  scale_rewards: 'group' (divide by the group's reward std, GRPO), 'batch' (by the std over the whole batch),
    'none' (Dr. GRPO: no scaling). A group with zero std gets advantage 0 exactly (no NaN even with std_eps = 0).
  std_ddof: 1 for the unbiased std (TRL, torch.std), 0 for the population std of spec 2.6 / fact 15; unbiased
    multiplies the advantage by sqrt((M-1)/M).
  loss_type: how per-token losses are aggregated (T = the mask's token axis, N = B*G sequences):
    'grpo'    mean over sequences of the token-mean of each sequence (sequence-mean of token-means);
    'bnpo'    token-mean over the whole batch (sum of losses / number of real tokens);
    'dapo'    the same as 'bnpo' on one process (TRL normalises by the global token count across processes);
    'dr_grpo' sum of losses / (N * T): a constant normaliser, no length bias (T is TRL's max_completion_length:
              the trainer's completion buffer, rationale budget + tag + answer budget);
    'seq_sum' mean over sequences of the token-sum (the sequence-level form of spec 2.6).
  With the pair form (logp_z_BxG sums, T = 1) every loss type is the sequence-level estimator.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tsallis_jax.estimators.types import SequenceLogProbs

__all__ = ["grpo_advantages", "grpo_loss", "grpo_grad", "GRPO_LOSS_TYPES", "GRPO_SCALE_REWARDS"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "seq_sum")
GRPO_SCALE_REWARDS = ("group", "batch", "none")


def _std(x: jax.Array, axis, ddof: int) -> jax.Array:
  count = x.size if axis is None else x.shape[axis]
  if count - ddof <= 0:
    raise ValueError(f"std over {count} values with ddof={ddof} is undefined; use std_ddof=0 or more samples.")
  mean = jnp.mean(x, axis=axis, keepdims=True)
  return jnp.sqrt(jnp.sum((x - mean) ** 2, axis=axis) / (count - ddof))


K3_MAX_LOG_RATIO = 20.0  # verl's low_var_kl clamps the log ratio here too: exp(20) is finite, exp(89) is not


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """The k3 estimate of KL(pi || pi_ref) per sampled token, exp(d) - d - 1 with d = ref_logp - logp (>= 0).

  d is clamped to +-K3_MAX_LOG_RATIO (as verl's `low_var_kl`), so a token the current policy has made ~90 nats less
  likely than the reference gives a large finite penalty instead of inf (found by tests/test_fuzz.py). The one place
  the trainer and `grpo_loss` compute it.
  """
  d = jnp.clip(ref_logp.astype(jnp.float32) - logp.astype(jnp.float32), -K3_MAX_LOG_RATIO, K3_MAX_LOG_RATIO)
  return jnp.exp(d) - d - 1.0


def grpo_advantages(rewards_BxG: jax.Array, *, scale_rewards: str = "group", std_eps: float = 1e-4,
                    std_ddof: int = 1) -> jax.Array:
  """Group-normalised advantages (r - group mean) / (std + std_eps); zero where the std is zero (spec 2.6)."""
  if scale_rewards not in GRPO_SCALE_REWARDS:
    raise ValueError(f"scale_rewards must be one of {GRPO_SCALE_REWARDS}, got {scale_rewards!r}.")
  rewards_BxG = jnp.asarray(rewards_BxG, jnp.float32)
  if rewards_BxG.ndim != 2:
    raise ValueError(f"rewards_BxG must be rank 2 (prompts, samples), got shape {rewards_BxG.shape}.")
  centred_BxG = rewards_BxG - jnp.mean(rewards_BxG, axis=1, keepdims=True)
  if scale_rewards == "none":
    return centred_BxG
  if scale_rewards == "group":
    std_Bx1 = _std(rewards_BxG, 1, std_ddof)[:, None]
  else:
    std_Bx1 = jnp.broadcast_to(_std(rewards_BxG, None, std_ddof), (rewards_BxG.shape[0], 1))
  degenerate_Bx1 = std_Bx1 <= 0
  safe_denominator_Bx1 = jnp.where(degenerate_Bx1, 1.0, std_Bx1 + std_eps)
  return jnp.where(degenerate_Bx1, 0.0, centred_BxG / safe_denominator_Bx1)


def _as_sequence(log_probs) -> SequenceLogProbs:
  if isinstance(log_probs, SequenceLogProbs):
    log_probs.check_shapes()
    return log_probs
  if isinstance(log_probs, (tuple, list)) and len(log_probs) == 2:
    logp_z_BxG = jnp.asarray(log_probs[0], jnp.float32)
    return SequenceLogProbs(logp_z_BxGxT=logp_z_BxG[..., None], mask_z_BxGxT=jnp.ones_like(logp_z_BxG)[..., None])
  if hasattr(log_probs, "ndim") and log_probs.ndim == 2:
    logp_z_BxG = jnp.asarray(log_probs, jnp.float32)
    return SequenceLogProbs(logp_z_BxGxT=logp_z_BxG[..., None], mask_z_BxGxT=jnp.ones_like(logp_z_BxG)[..., None])
  raise ValueError("grpo_loss takes a SequenceLogProbs, a (logp_z_BxG, logw_BxG) pair or logp_z_BxG, got "
                   f"{type(log_probs).__name__}.")


def grpo_loss(
    log_probs,
    rewards_BxG: jax.Array,
    *,
    loss_type: str = "grpo",
    scale_rewards: str = "group",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    std_eps: float = 1e-4,
    std_ddof: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO surrogate loss (module docstring lists the options) and its metrics.

  Args:
    log_probs: a `SequenceLogProbs` (per-token; `old_logp_z_BxGxT` enables the PPO ratio, `ref_logp_z_BxGxT` the
      KL), or the pair form `(logp_z_BxG, logw_BxG)` whose log w is ignored (GRPO uses rewards).
    rewards_BxG: binary or real rewards, constants.
    epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high]; epsilon_high None means epsilon.
    beta: the k3 KL coefficient; needs `ref_logp_z_BxGxT` when > 0.
  """
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}.")
  seq = _as_sequence(log_probs)
  logp_BxGxT = seq.logp_z_BxGxT.astype(jnp.float32)
  mask_BxGxT = seq.mask_z_BxGxT.astype(jnp.float32)
  rewards_BxG = jnp.asarray(rewards_BxG, jnp.float32)
  if rewards_BxG.shape != logp_BxGxT.shape[:2]:
    raise ValueError(f"rewards_BxG {rewards_BxG.shape} must match the log-probs' (B, G) = {logp_BxGxT.shape[:2]}.")
  if beta > 0 and seq.ref_logp_z_BxGxT is None:
    raise ValueError("beta > 0 needs reference log-probs: set SequenceLogProbs.ref_logp_z_BxGxT, or use beta=0.")
  epsilon_high = epsilon if epsilon_high is None else epsilon_high
  adv_BxG = jax.lax.stop_gradient(grpo_advantages(rewards_BxG, scale_rewards=scale_rewards, std_eps=std_eps,
                                                  std_ddof=std_ddof))
  safe_logp_BxGxT = jnp.where(mask_BxGxT > 0, logp_BxGxT, 0.0)
  if seq.old_logp_z_BxGxT is None:
    old_BxGxT = jax.lax.stop_gradient(safe_logp_BxGxT)
  else:
    old_BxGxT = jnp.where(mask_BxGxT > 0, seq.old_logp_z_BxGxT.astype(jnp.float32), 0.0)
  ratio_BxGxT = jnp.exp(safe_logp_BxGxT - old_BxGxT)
  adv_BxGx1 = adv_BxG[..., None]
  unclipped_BxGxT = ratio_BxGxT * adv_BxGx1
  clipped_BxGxT = jnp.clip(ratio_BxGxT, 1.0 - epsilon, 1.0 + epsilon_high) * adv_BxGx1
  per_token_BxGxT = -jnp.minimum(unclipped_BxGxT, clipped_BxGxT)
  kl_BxGxT = jnp.zeros_like(per_token_BxGxT)
  if seq.ref_logp_z_BxGxT is not None:
    ref_BxGxT = jnp.where(mask_BxGxT > 0, seq.ref_logp_z_BxGxT.astype(jnp.float32), safe_logp_BxGxT)
    kl_BxGxT = k3_kl(safe_logp_BxGxT, ref_BxGxT)
  if beta > 0:
    per_token_BxGxT = per_token_BxGxT + beta * kl_BxGxT

  num_sequences = mask_BxGxT.shape[0] * mask_BxGxT.shape[1]
  tokens_BxG = jnp.sum(mask_BxGxT, axis=-1)
  total_tokens = jnp.maximum(jnp.sum(mask_BxGxT), 1.0)
  summed_BxG = jnp.sum(per_token_BxGxT * mask_BxGxT, axis=-1)
  if loss_type == "grpo":
    loss = jnp.mean(summed_BxG / jnp.maximum(tokens_BxG, 1.0))
  elif loss_type in ("bnpo", "dapo"):
    loss = jnp.sum(summed_BxG) / total_tokens
  elif loss_type == "dr_grpo":
    loss = jnp.sum(summed_BxG) / (num_sequences * mask_BxGxT.shape[-1])
  else:
    loss = jnp.mean(summed_BxG)

  token_mean = lambda x: jnp.sum(x * mask_BxGxT) / total_tokens
  is_clipped_BxGxT = ((ratio_BxGxT < 1.0 - epsilon) & (adv_BxGx1 < 0)) | ((ratio_BxGxT > 1.0 + epsilon_high)
                                                                         & (adv_BxGx1 > 0))
  std_B = _std(rewards_BxG, 1, 0)
  aux = {
    "reward/mean": jnp.mean(rewards_BxG),
    "reward/std": _std(rewards_BxG, None, 0),
    "groups/frac_zero_std": jnp.mean((std_B <= 0).astype(jnp.float32)),
    "groups/frac_all_correct": jnp.mean(jnp.all(rewards_BxG >= 1.0, axis=1).astype(jnp.float32)),
    "groups/frac_all_wrong": jnp.mean(jnp.all(rewards_BxG <= 0.0, axis=1).astype(jnp.float32)),
    "ratio/clipfrac": token_mean(is_clipped_BxGxT.astype(jnp.float32)),
    "kl/ref": token_mean(kl_BxGxT),
    "advantage/abs_mean": jnp.mean(jnp.abs(adv_BxG)),
  }
  return loss, jax.lax.stop_gradient(aux)


def grpo_grad(
    logprob_fn: Callable[[Any, Any], Any],
    params: Any,
    batch: Any,
    *,
    rewards_BxG: jax.Array,
    **options,
) -> tuple[Any, dict[str, jax.Array]]:
  """The GRPO gradient of the loss (descent = -grads); `options` are those of `grpo_loss`; aux holds `loss` too.

  `logprob_fn(params, batch)` returns a `SequenceLogProbs` (token-level options, PPO ratio, KL) or the pair form.
  Spec 2.6 / fact 15: on-policy, beta = 0, population std, the expected ascent direction is
  grad P E[sqrt(p-hat (1 - p-hat))] / (P (1 - P)); a group with no success gives exactly zero.
  """
  def loss_fn(p):
    return grpo_loss(logprob_fn(p, batch), rewards_BxG, **options)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, {**aux, "loss": loss}
