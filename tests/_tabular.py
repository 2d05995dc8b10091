"""A tiny tabular softmax policy for the estimator tests (spec 2.7, 2.4).

Each of B prompts has K complete trajectories with softmax logits theta_BxK, and trajectory k has answer likelihood
w_k = sigmoid(phi_k) (continuous weights, which exercise the pathwise term) or a fixed 0/1 reward (binary weights,
no pathwise term). The exact success probability P = sum_k pi_k w_k gives the reference loss `jq_loss(log P)`.
Helpers enumerate every multiset of M samples (the multinomial counts) so expectations can be computed exactly.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


def init_params(key, num_prompts: int, num_traj: int, scale: float = 1.0) -> dict[str, jax.Array]:
  """Random logits and answer-likelihood logits, one row per prompt."""
  k1, k2 = jax.random.split(key)
  return {
    "logits_BxK": scale * jax.random.normal(k1, (num_prompts, num_traj)),
    "phi_BxK": scale * jax.random.normal(k2, (num_prompts, num_traj)),
  }


def logprob_fn(params, batch):
  """The estimators' contract: (log p(z_g|x), log w_g) of the sampled trajectory indices batch['idx_BxG'].

  With batch['reward_BxK'] present the weight is that fixed 0/1 reward (log w in {0, -inf}); otherwise it is
  sigmoid(phi_k), differentiable in params.
  """
  idx_BxG = batch["idx_BxG"]
  logpi_BxK = jax.nn.log_softmax(params["logits_BxK"].astype(jnp.float32), axis=-1)
  logp_z_BxG = jnp.take_along_axis(logpi_BxK, idx_BxG, axis=1)
  if "reward_BxK" in batch:
    logw_BxK = jnp.where(batch["reward_BxK"] > 0, 0.0, -jnp.inf)
  else:
    logw_BxK = jax.nn.log_sigmoid(params["phi_BxK"])
  return logp_z_BxG, jnp.take_along_axis(logw_BxK, idx_BxG, axis=1)


def log_success(params, reward_BxK=None) -> jax.Array:
  """log P per prompt, exact."""
  logpi_BxK = jax.nn.log_softmax(params["logits_BxK"], axis=-1)
  if reward_BxK is None:
    logw_BxK = jax.nn.log_sigmoid(params["phi_BxK"])
  else:
    logw_BxK = jnp.where(reward_BxK > 0, 0.0, -jnp.inf)
  return jax.nn.logsumexp(logpi_BxK + logw_BxK, axis=-1)


def sample(key, params, num_samples: int) -> jax.Array:
  """idx_BxG ~ pi, i.i.d. per prompt."""
  return jax.random.categorical(key, params["logits_BxK"], axis=-1,
                                shape=(num_samples, params["logits_BxK"].shape[0])).T


def multisets(num_traj: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
  """Every multiset of `num_samples` draws from `num_traj` trajectories: (idx_NxG sorted samples, counts_NxK)."""
  idx_rows, count_rows = [], []
  for combo in itertools.combinations_with_replacement(range(num_traj), num_samples):
    idx_rows.append(combo)
    count_rows.append(np.bincount(combo, minlength=num_traj))
  return np.asarray(idx_rows, np.int32), np.asarray(count_rows, np.int64)


def multinomial_pmf(counts_NxK: np.ndarray, pi_K: np.ndarray) -> np.ndarray:
  """Probability of each count vector under Multinomial(M, pi), float64."""
  return np.asarray([stats.multinomial.pmf(c, c.sum(), pi_K) for c in counts_NxK])


def binomial_rho(q: float, num_samples: int, p: float) -> float:
  """rho = E[(S/M)^(1-q)] / P^(1-q), S ~ Bin(M, P), 0^(1-q) = 0 for q < 1 and 1{S >= 1} at q = 1 (spec 2.4)."""
  s = np.arange(num_samples + 1)
  pmf = stats.binom.pmf(s, num_samples, p)
  if q >= 1.0:
    return float(1.0 - pmf[0])
  frac = np.where(s > 0, (s / num_samples) ** (1.0 - q), 0.0)
  return float(np.sum(pmf * frac) / p ** (1.0 - q))


def grpo_factor(num_samples: int, p: float) -> float:
  """E[sqrt(p-hat (1 - p-hat))] / (P (1 - P)), p-hat = S/M, S ~ Bin(M, P) (spec 2.6, fact 15)."""
  s = np.arange(num_samples + 1)
  phat = s / num_samples
  return float(np.sum(stats.binom.pmf(s, num_samples, p) * np.sqrt(phat * (1 - phat))) / (p * (1 - p)))


def num_multisets(num_traj: int, num_samples: int) -> int:
  return math.comb(num_traj + num_samples - 1, num_samples)


def init_shared_params(key, num_traj: int) -> dict[str, jax.Array]:
  """Parameters shared by every prompt, as in a real model (the sharding tests replicate them)."""
  k1, k2 = jax.random.split(key)
  return {"logits_K": jax.random.normal(k1, (num_traj,)), "phi_K": jax.random.normal(k2, (num_traj,))}


def shared_logprob_fn(params, batch):
  """The contract with shared params: prompt b's logits are params + batch['offset_BxK'] (per-prompt data)."""
  logits_BxK = params["logits_K"][None, :] + batch["offset_BxK"]
  logpi_BxK = jax.nn.log_softmax(logits_BxK.astype(jnp.float32), axis=-1)
  logw_BxK = jax.nn.log_sigmoid(params["phi_K"][None, :] + batch["phi_offset_BxK"])
  if "reward_BxK" in batch:
    logw_BxK = jnp.where(batch["reward_BxK"] > 0, 0.0, -jnp.inf)
  idx_BxG = batch["idx_BxG"]
  return jnp.take_along_axis(logpi_BxK, idx_BxG, axis=1), jnp.take_along_axis(logw_BxK, idx_BxG, axis=1)
