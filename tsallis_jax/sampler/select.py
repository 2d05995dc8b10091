"""Token selection: one draw per row from the tempered, optionally top-k / top-p filtered softmax (spec §1.7).

C is the number of candidate tokens a draw chooses among: the whole vocabulary, or the top k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tsallis_jax.sampler.config import SamplingConfig

Array = jax.Array

#: Candidate counts above this are sampled through a two-level (block, then within-block) inverse CDF.
FLAT_CDF_MAX = 128


def inverse_cdf_sample(u_N: Array, scaled_NxC: Array, block: int | None = None) -> tuple[Array, Array]:
  """One draw per row from softmax(scaled_NxC) by inverting its CDF at a uniform u_N in [0, 1).

  Returns `(index_N, log_z_N)` with log_z = log-sum-exp(scaled_NxC). Index t is drawn iff cdf[t-1] < v <= cdf[t]
  with v = (1 - u) * total uniform on (0, total], so zero-weight (filtered, -inf) entries are never drawn. One uniform
  per row instead of one Gumbel per vocabulary entry: on CPU the random bits, not the arithmetic, dominate
  `jax.random.categorical`.

  Over more than `FLAT_CDF_MAX` candidates (a real vocabulary) the CDF is inverted in two levels: the C weights are
  cut into Z blocks of W = `block` entries (W about sqrt(C), a power of two), v picks a block on the cumulative
  block sums, then an entry on the cumulative sum inside that block. Same distribution, but one pass of exp + block
  sums over C instead of a scan over C (the scan cost 2.5 ms of a 60 ms SmolLM2 decode step on CPU).
  """
  n, c = scaled_NxC.shape
  max_Nx1 = jnp.max(scaled_NxC, axis=-1, keepdims=True)
  weights_NxC = jnp.exp(scaled_NxC - max_Nx1)
  if block is None:
    if c <= FLAT_CDF_MAX:
      cdf_NxC = jnp.cumsum(weights_NxC, axis=-1)
      total_Nx1 = cdf_NxC[:, -1:]
      v_Nx1 = (1.0 - u_N[:, None]) * total_Nx1
      index_N = jnp.sum(cdf_NxC < v_Nx1, axis=-1, dtype=jnp.int32)
      return index_N, max_Nx1[:, 0] + jnp.log(total_Nx1[:, 0])
    block = 1 << int(np.ceil(np.log2(np.sqrt(c))))
  num_blocks = -(-c // block)
  weights_NxZxW = jnp.pad(weights_NxC, ((0, 0), (0, num_blocks * block - c))).reshape(n, num_blocks, block)
  block_sum_NxZ = jnp.sum(weights_NxZxW, axis=-1)
  block_cdf_NxZ = jnp.cumsum(block_sum_NxZ, axis=-1)
  total_N = block_cdf_NxZ[:, -1]
  v_N = (1.0 - u_N) * total_N
  # v <= total = block_cdf[-1], so the block index is at most Z - 1 and its block sum is positive.
  block_N = jnp.minimum(jnp.sum(block_cdf_NxZ < v_N[:, None], axis=-1, dtype=jnp.int32), num_blocks - 1)
  before_N = jnp.take_along_axis(block_cdf_NxZ - block_sum_NxZ, block_N[:, None], axis=-1)[:, 0]
  inner_NxW = jnp.take_along_axis(weights_NxZxW, block_N[:, None, None], axis=1)[:, 0]
  inner_cdf_NxW = jnp.cumsum(inner_NxW, axis=-1)
  # Rounding can put v - before a hair outside (0, block total]; clipping into it keeps the draw on a positive weight.
  inner_total_N = inner_cdf_NxW[:, -1]
  v_in_N = jnp.clip(v_N - before_N, inner_total_N * jnp.finfo(jnp.float32).eps, inner_total_N)
  offset_N = jnp.sum(inner_cdf_NxW < v_in_N[:, None], axis=-1, dtype=jnp.int32)
  return block_N * block + offset_N, max_Nx1[:, 0] + jnp.log(total_N)


def select_tokens(u_N: Array, logits_NxV: Array, config: SamplingConfig) -> tuple[Array, Array, Array]:
  """`sample_from_logits` with the row's uniform draw u_N in [0, 1) given (the decode loop draws them up front)."""
  logits_NxV = logits_NxV.astype(jnp.float32)
  if config.temperature == 0.0:
    token_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    return token_N, jnp.zeros(token_N.shape, jnp.float32), jax.nn.logsumexp(logits_NxV, axis=-1)
  scaled_NxV = logits_NxV / config.temperature
  if not config.filtered:
    token_N, log_z_N = inverse_cdf_sample(u_N, scaled_NxV)
    logp_N = jnp.take_along_axis(scaled_NxV, token_N[:, None], axis=-1)[:, 0] - log_z_N
    return token_N, logp_N, log_z_N
  log_z_N = jax.nn.logsumexp(scaled_NxV, axis=-1)
  # Candidates sorted by decreasing logit: the top k, or the whole vocabulary when only top-p is on.
  num_candidates = min(config.top_k, scaled_NxV.shape[-1]) if config.top_k else scaled_NxV.shape[-1]
  cand_NxC, cand_ids_NxC = jax.lax.top_k(scaled_NxV, num_candidates)
  if config.top_p < 1.0:
    probs_NxC = jax.nn.softmax(cand_NxC, axis=-1)
    mass_before_NxC = jnp.cumsum(probs_NxC, axis=-1) - probs_NxC
    cand_NxC = jnp.where(mass_before_NxC < config.top_p, cand_NxC, -jnp.inf)
  index_N, log_kept_N = inverse_cdf_sample(u_N, cand_NxC)
  token_N = jnp.take_along_axis(cand_ids_NxC, index_N[:, None], axis=-1)[:, 0].astype(jnp.int32)
  logp_N = jnp.take_along_axis(cand_NxC, index_N[:, None], axis=-1)[:, 0] - log_kept_N
  return token_N, logp_N, log_z_N


def sample_from_logits(key: Array, logits_NxV: Array, config: SamplingConfig) -> tuple[Array, Array, Array]:
  """Draws one token per row from softmax(logits / T) after top-k / top-p filtering.

  Returns `(token_N, logp_N, log_z_N)`: the token, its log-prob under the filtered, renormalised distribution it was
  drawn from (0 under greedy), and log-sum-exp(logits / T) over the full vocabulary (T = 1 under greedy), so that
  `logits / T - log_z` is the unfiltered log-softmax at the sampling temperature.
  """
  return select_tokens(jax.random.uniform(key, logits_NxV.shape[:1], jnp.float32), logits_NxV, config)

