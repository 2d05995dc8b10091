"""Posterior-Attenuated Fine-Tuning (PAFT): spec 1.6 eq. 14 / Algorithm 2, spec 2.3.

Draw r_1..r_K ~ Categorical(w / sum w) with replacement from the prior pool (importance resampling); the loss

  L_PAFT = -(1/M^q) mean_B sg(w-bar_M^(1-q)) (1/K) sum_k [ log p(z_{r_k}|x) + log w_{r_k} ]

is teacher-forced SFT on (x*, z_{r_k}, y*) with instance weight w-bar_M^(1-q). E[PAFT | pool] = GARL plug-in
(Prop D.3), and Var(PAFT) >= Var(GARL) (Prop D.4).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tsallis_jax.estimators import _weights
from tsallis_jax.estimators.types import as_pair
from tsallis_jax.qlog import check_q

__all__ = ["paft_loss", "paft_grad", "resample_counts"]


def resample_counts(key: jax.Array, logw_BxG: jax.Array, num_resamples: int) -> jax.Array:
  """How often each sample is drawn in `num_resamples` draws from Categorical(w / sum w), per group, as float32.

  `key` is one PRNG key (split over the groups) or one key per group (leading axis B, e.g. `jax.random.split(key,
  B)` done before sharding, so that the draws do not depend on how the batch is split over devices). A
  zero-success group draws uniformly; its counts are multiplied by a zero instance weight downstream.
  """
  num_groups, num_samples = logw_BxG.shape
  key = jnp.asarray(key)
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == (0 if typed else 1)
  keys_B = jax.random.split(key, num_groups) if single else key
  if keys_B.shape[0] != num_groups:
    raise ValueError(f"got {keys_B.shape[0]} resampling keys for {num_groups} prompts; pass one key, or one per "
                     "prompt.")
  all_zero_B = jnp.all(jnp.isneginf(logw_BxG), axis=1)
  logits_BxG = jnp.where(all_zero_B[:, None], 0.0, logw_BxG)
  draw = lambda k, logits_G: jax.random.categorical(k, logits_G, shape=(num_resamples,))
  index_BxR = jax.vmap(draw)(keys_B, logits_BxG)
  return jnp.sum(jax.nn.one_hot(index_BxR, num_samples, dtype=jnp.float32), axis=1)


def paft_loss(
    logp_z_BxG: jax.Array,
    logw_BxG: jax.Array,
    key: jax.Array,
    *,
    q,
    num_resamples: int | None = None,
    normalize_by_Mq: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The PAFT surrogate loss and its metrics; `jax.grad` of the loss is the PAFT gradient estimate (eq. 14).

  Args:
    logp_z_BxG, logw_BxG: as in `garl_loss` (log w differentiable: the SFT term on the answer).
    key: PRNG key for the resampling (one, or one per prompt; see `resample_counts`).
    q: commitment in [0, 1] (validated when concrete).
    num_resamples: K, the number of draws with replacement per prompt; None means K = M (the paper's choice).
    normalize_by_Mq: multiply by 1/M^q as Algorithm 2 does (default); False gives eq. 14 as written.

  Zero-success groups (binary rewards, all w_m = 0) give an exactly zero gradient (spec 2.3: "PAFT is undefined
  when P is 0"; we define it as 0, like GARL). At q = 1 the instance weight is 1 (STaR / TRICE-like SFT on
  posterior samples); at q = 0 it is w-bar_M.
  """
  check_q(q)
  logp_z_BxG = jnp.asarray(logp_z_BxG, jnp.float32)
  logw_BxG = jnp.asarray(logw_BxG, jnp.float32)
  _weights.validate_pair(logp_z_BxG, logw_BxG)
  num_samples = logp_z_BxG.shape[1]
  num_resamples = num_samples if num_resamples is None else int(num_resamples)
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1 (or None for K = M), got {num_resamples}.")
  q_f32 = jnp.asarray(q, jnp.float32)
  sg_logw_BxG = jax.lax.stop_gradient(logw_BxG)
  counts_BxG = resample_counts(key, sg_logw_BxG, num_resamples)
  log_wbar_B = _weights.log_mean_w(sg_logw_BxG)
  zero_B = jnp.isneginf(log_wbar_B)
  instance_B = jnp.where(zero_B, 0.0, jnp.exp((1.0 - q_f32) * jnp.where(zero_B, 0.0, log_wbar_B)))
  coef_BxG = jax.lax.stop_gradient(instance_B[:, None] * counts_BxG / num_resamples)
  safe_logw_BxG = jnp.where(jnp.isneginf(logw_BxG), 0.0, logw_BxG)  # never drawn unless the group is all zero
  per_group_B = -jnp.sum(coef_BxG * (logp_z_BxG + safe_logw_BxG), axis=1)
  scale = jnp.exp(_weights.log_normalizer_Mq(num_samples, q)) if normalize_by_Mq else jnp.float32(1.0)
  loss = scale * jnp.mean(per_group_B)
  aux = _weights.weight_metrics(sg_logw_BxG, q)
  aux["paft/unique_frac"] = jnp.mean(jnp.sum((counts_BxG > 0).astype(jnp.float32), axis=1) / num_samples)
  return loss, aux


def paft_grad(
    logprob_fn: Callable[[Any, Any], Any],
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    q,
    num_resamples: int | None = None,
    normalize_by_Mq: bool = True,
) -> tuple[Any, dict[str, jax.Array]]:
  """The PAFT gradient of the loss (descent = -grads), averaged over the B prompts (spec eq. 14, Algorithm 2).

  `logprob_fn(params, batch)` returns `(logp_z_BxG, logw_BxG)` or a `SequenceLogProbs` with answer tokens. See
  `paft_loss` for the arguments; aux additionally holds `loss`.
  """
  check_q(q)

  def loss_fn(p):
    logp_z_BxG, logw_BxG = as_pair(logprob_fn(p, batch))
    return paft_loss(logp_z_BxG, logw_BxG, key, q=q, num_resamples=num_resamples,
                     normalize_by_Mq=normalize_by_Mq)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, {**aux, "loss": loss}
