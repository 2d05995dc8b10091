"""KV-cached rollout sampler: one prefill per prompt, one jitted `lax.while_loop` decode (spec §1.6, §1.7).

The trainer draws M rationales per prompt from the current policy (spec §1.6, "draw M i.i.d. rationales from the
prior") and evaluation draws 16 per prompt (spec §1.7). This module does both:

* **Prefill once, decode G times.** The B prompts are prefilled once into a B-row KV cache; the cache rows are then
  repeated G times (N = B*G rows, row `b*G + g` is sample g of prompt b), so the prompt is never recomputed per sample.
  The same holds across requests: `Sampler` prefills a prompt that appears several times in one batch once
  (`prompt_of_R` maps each request to its prompt row), as vLLM's prefix cache does for exact repeats.
* **One jitted loop.** Decoding is a single `lax.while_loop` over fixed-size buffers (tokens, log-probs, masks, KV
  cache) that stops as soon as every row is done. Nothing in it syncs with the host or runs Python per token.
* **Any padding, bucketed lengths.** Prompts may be left- or right-padded (any pad mask); they are left-aligned on
  device, so every row's last prompt token sits in the same cache slot. `pad_prompts` pads a ragged batch up to a
  bucket length so jit compiles a handful of prompt shapes.
* **Budget forcing** (spec §1.7, s1-style): with `close_tag_ids` set, a row that has not closed its rationale after
  `rationale_budget` tokens is force-fed the closing tag (`</think>`, possibly several tokens) and then gets its own
  `answer_budget`. A row whose model emits the tag by itself switches to the answer phase there.

Log-probs. Two per token are returned:

* `logp_NxT`: log-prob under the distribution the token was actually drawn from, i.e. softmax(logits / T) after the
  top-k / top-p filter, renormalised over the kept tokens. Greedy decoding (T = 0) is a point mass, so it is 0; forced
  tokens are 0 too (they were not drawn).
* `model_logp_NxT`: log softmax(logits / T) of the token with no filter (T = 1 under greedy), also for forced tokens.
  This is what a teacher-forced forward pass at the same temperature gives, so `mismatch/logp_abs_diff` compares the
  trainer's recomputed log-probs to this array.

Without filtering and with T > 0 the two are equal except on forced tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tsallis_jax import model as model_lib

Array = jax.Array

#: Prompt-length buckets used by `pad_prompts` (and `Sampler`) unless given: jit compiles one shape per bucket.
DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: one compiled `generate` per config and prompt bucket).

  Attributes:
    num_samples: G, samples drawn per prompt (the paper's M = 32 in training, 16 in evaluation, spec §1.7).
    max_new_tokens: completion length T when budget forcing is off.
    temperature: T > 0 samples from softmax(logits / T); 0 decodes greedily.
    top_k: keep only the k most likely tokens (0 disables).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 disables); applied after
      top-k, on the renormalised top-k distribution (the `transformers` order).
    stop_ids: token ids that end a sequence (EOS and any stop tokens); the stop token itself is kept in the
      completion and counts towards its length.
    pad_id: written after a sequence has ended.
    close_tag_ids: token ids of the closing tag (e.g. `</think>`); non-empty enables budget forcing (spec §1.7).
    rationale_budget: rationale tokens a row may sample before the closing tag is forced.
    answer_budget: tokens a row may sample after its closing tag.
    cache_dtype: KV-cache dtype name; None uses the model's compute dtype.
  """
  num_samples: int = 1
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  close_tag_ids: tuple[int, ...] = ()
  rationale_budget: int = 0
  answer_budget: int = 0
  cache_dtype: str | None = None

  def __post_init__(self):
    for name in ("num_samples", "max_new_tokens"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"SamplingConfig.{name} must be a positive int, got {value!r}.")
    if not self.temperature >= 0.0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 disables it), got {self.top_k!r}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 disables it), got {self.top_p!r}.")
    for name in ("stop_ids", "close_tag_ids"):
      value = getattr(self, name)
      if not isinstance(value, tuple) or not all(isinstance(t, (int, np.integer)) and t >= 0 for t in value):
        raise ValueError(f"SamplingConfig.{name} must be a tuple of non-negative ints, got {value!r}; "
                         "pass e.g. (tokenizer.eos_token_id,).")
    if self.close_tag_ids:
      if self.rationale_budget <= 0 or self.answer_budget <= 0:
        raise ValueError(
          "Budget forcing is on (close_tag_ids is set) but rationale_budget="
          f"{self.rationale_budget} and answer_budget={self.answer_budget}; set both to positive token counts "
          "(the paper uses e.g. rationale 4096-128 and answer 128 on FinQA), or leave close_tag_ids empty.")
    elif self.rationale_budget or self.answer_budget:
      raise ValueError("rationale_budget/answer_budget are set but close_tag_ids is empty; pass the closing tag's "
                       "token ids (e.g. tokenizer.encode('</think>')) to enable budget forcing.")
    if self.cache_dtype is not None and self.cache_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"SamplingConfig.cache_dtype={self.cache_dtype!r}; use 'float32', 'bfloat16', 'float16' "
                       "or None (the model's compute dtype).")

  @property
  def budget_forcing(self) -> bool:
    return bool(self.close_tag_ids)

  @property
  def completion_len(self) -> int:
    """T, the completion buffer length: rationale + closing tag + answer budgets, or `max_new_tokens`."""
    if self.budget_forcing:
      return self.rationale_budget + len(self.close_tag_ids) + self.answer_budget
    return self.max_new_tokens

  @property
  def filtered(self) -> bool:
    return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)


@flax.struct.dataclass
class Rollout:
  """Sampled completions for N = B*G rows; row `b*G + g` is sample g of prompt b.

  Attributes:
    prompt_tokens_NxP: the prompts, left-aligned (pads first), repeated G times.
    prompt_mask_NxP: True on real prompt tokens (the prompt segment).
    tokens_NxT: completion tokens, `pad_id` after the end.
    logp_NxT: log-prob of each token under the sampling distribution (tempered, filtered); 0 on forced tokens, under
      greedy decoding and after the end.
    model_logp_NxT: log softmax(logits / T) of each token, unfiltered (T = 1 under greedy); the value a teacher-forced
      forward pass at the sampling temperature reproduces; 0 after the end.
    mask_NxT: True on completion tokens (stop token and forced tokens included).
    forced_mask_NxT: True on tokens that budget forcing fed in instead of sampling.
    rationale_mask_NxT: True on the rationale segment, closing tag included (all False without budget forcing).
    answer_mask_NxT: True on the answer segment (the whole completion without budget forcing).
    lengths_N: number of completion tokens.
    answer_start_N: index of the first answer token (the rationale length with its closing tag; 0 without budget
      forcing; `lengths_N` for a row that stopped inside its rationale, which has no answer). Teacher-force a gold
      answer after `tokens_NxT[:, :answer_start_N]` for the paper's weight w = p(y*|x, z) (spec §1.6, eq. 7).
    closed_N: the closing tag is present (sampled or forced).
    forced_N: the closing tag was forced.
    truncated_N: the row ran out of budget instead of emitting a stop token.
    num_steps: completion positions generated (token 0 from the prefill's logits, then one decode step each;
      fewer than T when every row stopped early).
  """
  prompt_tokens_NxP: Array
  prompt_mask_NxP: Array
  tokens_NxT: Array
  logp_NxT: Array
  model_logp_NxT: Array
  mask_NxT: Array
  forced_mask_NxT: Array
  rationale_mask_NxT: Array
  answer_mask_NxT: Array
  lengths_N: Array
  answer_start_N: Array
  closed_N: Array
  forced_N: Array
  truncated_N: Array
  num_steps: Array


# ------------------------------------------------------------------------------------------------ token selection


#: Candidate counts above this are sampled through a two-level (block, then within-block) inverse CDF.
FLAT_CDF_MAX = 128


def _inverse_cdf_sample(u_N: Array, scaled_NxC: Array, block: int | None = None) -> tuple[Array, Array]:
  """One draw per row from softmax(scaled_NxC) by inverting its CDF at a uniform u_N in [0, 1).

  Returns `(index_N, log_z_N)` with log_z = log-sum-exp(scaled_NxC). Index t is drawn iff cdf[t-1] < v <= cdf[t]
  with v = (1 - u) * total uniform on (0, total], so zero-weight (filtered, -inf) entries are never drawn. One uniform
  per row instead of one Gumbel per vocabulary entry: on CPU the random bits, not the arithmetic, dominate
  `jax.random.categorical`.

  Over more than `FLAT_CDF_MAX` candidates (a real vocabulary) the CDF is inverted in two levels: the C weights are
  cut into blocks of `block` (about sqrt(C), a power of two), v picks a block on the cumulative block sums, then an
  entry on the cumulative sum inside that block. Same distribution, but one pass of exp + block sums over C instead
  of a scan over C (the scan cost 2.5 ms of a 60 ms SmolLM2 decode step on CPU).
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
  weights_NxBxW = jnp.pad(weights_NxC, ((0, 0), (0, num_blocks * block - c))).reshape(n, num_blocks, block)
  block_sum_NxB = jnp.sum(weights_NxBxW, axis=-1)
  block_cdf_NxB = jnp.cumsum(block_sum_NxB, axis=-1)
  total_N = block_cdf_NxB[:, -1]
  v_N = (1.0 - u_N) * total_N
  # v <= total = block_cdf[-1], so the block index is at most B - 1 and its block sum is positive.
  block_N = jnp.minimum(jnp.sum(block_cdf_NxB < v_N[:, None], axis=-1, dtype=jnp.int32), num_blocks - 1)
  before_N = jnp.take_along_axis(block_cdf_NxB - block_sum_NxB, block_N[:, None], axis=-1)[:, 0]
  inner_NxW = jnp.take_along_axis(weights_NxBxW, block_N[:, None, None], axis=1)[:, 0]
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
    token_N, log_z_N = _inverse_cdf_sample(u_N, scaled_NxV)
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
  index_N, log_kept_N = _inverse_cdf_sample(u_N, cand_NxC)
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


# ------------------------------------------------------------------------------------------------ generate


def _left_align(tokens_BxP: Array, mask_BxP: Array) -> tuple[Array, Array]:
  """Moves every row's real tokens to the end, in order (pads first): any padding becomes left padding."""
  order_BxP = jnp.argsort(mask_BxP, axis=-1, stable=True)
  return (jnp.take_along_axis(tokens_BxP, order_BxP, axis=-1),
          jnp.take_along_axis(mask_BxP, order_BxP, axis=-1))


def _model_config(model: nnx.Module) -> Any:
  for name in ("config", "cfg"):
    if hasattr(model, name):
      return getattr(model, name)
  raise ValueError(f"{type(model).__name__} has no `config`/`cfg` attribute; the sampler needs the model's "
                   "ModelConfig to size the KV cache.")


class _DecodeState(flax.struct.PyTreeNode):
  step: Array
  fed_N: Array
  cache: Any
  tokens_NxT: Array
  logp_NxT: Array
  model_logp_NxT: Array
  forced_mask_NxT: Array
  done_N: Array
  stopped_N: Array
  lengths_N: Array
  answer_phase_N: Array
  answer_start_N: Array
  window_NxC: Array


def generate_impl(graphdef: nnx.GraphDef, params: Any, prompt_tokens_BxP: Array, prompt_mask_BxP: Array,
                  key: Array, config: SamplingConfig, prompt_of_R: Array | None = None) -> Rollout:
  """Samples G completions per prompt (unjitted body of `generate`; call `generate` or `Sampler`)."""
  model = nnx.merge(graphdef, params)
  model_cfg = _model_config(model)
  if prompt_tokens_BxP.ndim != 2 or prompt_mask_BxP.shape != prompt_tokens_BxP.shape:
    raise ValueError(f"prompt tokens {prompt_tokens_BxP.shape} and mask {prompt_mask_BxP.shape} must be the same "
                     "rank-2 shape (prompts x length); build both with `pad_prompts`.")
  vocab_size = getattr(model_cfg, "vocab_size", None)
  if vocab_size is not None and any(t >= vocab_size for t in config.close_tag_ids + (config.pad_id,)):
    raise ValueError(f"close_tag_ids={config.close_tag_ids} or pad_id={config.pad_id} is outside the model's "
                     f"vocabulary of {vocab_size} ids; encode them with the model's tokenizer.")
  B, P = prompt_tokens_BxP.shape
  if prompt_of_R is not None and prompt_of_R.ndim != 1:
    raise ValueError(f"prompt_of_R must be rank 1 (one prompt row index per request), got shape {prompt_of_R.shape}.")
  R = B if prompt_of_R is None else prompt_of_R.shape[0]
  G, T = config.num_samples, config.completion_len
  N, S = R * G, P + T
  if config.cache_dtype is not None:
    cache_dtype = jnp.dtype(config.cache_dtype)
  else:
    cache_dtype = jnp.dtype(getattr(model_cfg, "dtype", "float32"))

  prompt_tokens_BxP, prompt_mask_BxP = _left_align(prompt_tokens_BxP.astype(jnp.int32),
                                                   prompt_mask_BxP.astype(bool))
  prompt_len_B = jnp.sum(prompt_mask_BxP, axis=-1, dtype=jnp.int32)
  positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1, dtype=jnp.int32) - 1, 0)

  # Prefill the prompts, once per prompt row, into cache slots [0, P). Left-aligned, every row's last prompt token
  # sits in slot P-1, and its logits (the only ones computed over the prompt) give the first completion token, so
  # decoding starts at the second token: one N-row model call fewer than feeding the last prompt token in the loop.
  cache = model_lib.init_cache(model_cfg, batch_size=B, max_len=S, dtype=cache_dtype)
  attn_BxPxS = jnp.pad(model_lib.make_attention_mask(prompt_mask_BxP), ((0, 0), (0, 0), (0, S - P)))
  if hasattr(model, "hidden") and hasattr(model, "logits"):  # the LM head on the last position only
    hidden_BxPxD, cache = model.hidden(prompt_tokens_BxP, positions_BxP, attn_BxPxS, cache=cache,
                                       cache_index=jnp.int32(0))
    last_logits_Bx1xV = model.logits(hidden_BxPxD[:, -1:])
  else:
    logits_BxPxV, cache = model(prompt_tokens_BxP, positions_BxP, attn_BxPxS, cache=cache, cache_index=jnp.int32(0))
    last_logits_Bx1xV = logits_BxPxV[:, -1:]

  def per_row(x: Array) -> Array:
    """Row n = r*G + g continues prompt row r (or prompt_of_R[r]): prefilled rows are copied, never recomputed."""
    if prompt_of_R is None:  # the trainer's case; a repeat keeps the rows' batch sharding under a mesh
      return jnp.repeat(x, G, axis=0)
    return jnp.take(x, jnp.repeat(prompt_of_R.astype(jnp.int32), G, axis=0), axis=0)

  def per_sample(x):
    if x.ndim == 0 or x.shape[0] != B:
      raise ValueError(f"KV-cache leaf of shape {x.shape} does not lead with the batch size {B}; the sampler "
                       "repeats cache rows per sample and needs every cache leaf batch-major.")
    return per_row(x)

  rules = getattr(model_cfg, "sharding_rules", None)
  cache = jax.tree.map(per_sample, cache)
  if rules is not None:  # Keep the repeated cache batch-sharded under a mesh (a no-op without one).
    cache = jax.tree.map(
      lambda x: model_lib.constrain(x, model_lib.CACHE_LOGICAL_AXES, rules), cache)
  prompt_tokens_NxP = per_row(prompt_tokens_BxP)
  prompt_mask_NxP = per_row(prompt_mask_BxP)
  # The fed token always attends to itself, so an empty prompt cannot give an all-masked softmax row.
  prompt_keys_NxP = prompt_mask_NxP.at[:, -1].set(True)
  prompt_len_N = per_row(prompt_len_B)
  first_logits_NxV = per_row(last_logits_Bx1xV[:, 0].astype(jnp.float32))

  stop_ids_C = jnp.asarray(config.stop_ids or (-1,), jnp.int32)
  tag_C = jnp.asarray(config.close_tag_ids or (-1,), jnp.int32)
  slots_T = jnp.arange(T, dtype=jnp.int32)
  # All the randomness up front, one uniform per row and step: no random-bit generation inside the loop.
  uniforms_TxN = jax.random.uniform(key, (T, N), jnp.float32)

  def cond(state: _DecodeState) -> Array:
    return (state.step < T) & ~jnp.all(state.done_N)

  def body(state: _DecodeState) -> _DecodeState:
    i = state.step
    # Feed the previous token (completion token i-1) into slot P-1+i and read the next-token logits.
    attn_Nx1xS = jnp.concatenate([prompt_keys_NxP, jnp.broadcast_to(slots_T < i, (N, T))], axis=-1)[:, None, :]
    positions_Nx1 = (prompt_len_N - 1 + i)[:, None]
    logits_Nx1xV, cache = model(state.fed_N[:, None], positions_Nx1, attn_Nx1xS, cache=state.cache,
                                cache_index=P - 1 + i)
    return advance(state, logits_Nx1xV[:, 0].astype(jnp.float32), cache)

  def advance(state: _DecodeState, logits_NxV: Array, cache: Any) -> _DecodeState:
    """Chooses completion token i = state.step from its logits and records it."""
    i = state.step
    token_N, logp_N, log_z_N = select_tokens(uniforms_TxN[i], logits_NxV, config)

    forced_N = jnp.zeros((N,), bool)
    if config.budget_forcing:
      tag_index = i - config.rationale_budget
      in_tag_window = (tag_index >= 0) & (tag_index < tag_C.shape[0])
      forced_N = ~state.answer_phase_N & in_tag_window
      forced_token = tag_C[jnp.clip(tag_index, 0, tag_C.shape[0] - 1)]
      token_N = jnp.where(forced_N, forced_token, token_N)
      logp_N = jnp.where(forced_N, 0.0, logp_N)

    inv_temperature = 1.0 / config.temperature if config.temperature > 0 else 1.0
    model_logp_N = (jnp.take_along_axis(logits_NxV, token_N[:, None], axis=-1)[:, 0] * inv_temperature - log_z_N)
    if config.temperature > 0 and not config.filtered:  # the same number: reuse it (the first gather is dead code)
      logp_N = jnp.where(forced_N, 0.0, model_logp_N)

    live_N = ~state.done_N
    token_N = jnp.where(live_N, token_N, config.pad_id)
    logp_N = jnp.where(live_N, logp_N, 0.0)
    model_logp_N = jnp.where(live_N, model_logp_N, 0.0)
    forced_N = forced_N & live_N

    stop_N = live_N & jnp.any(token_N[:, None] == stop_ids_C[None, :], axis=-1)
    answer_phase_N, answer_start_N, window_NxC = state.answer_phase_N, state.answer_start_N, state.window_NxC
    budget_done_N = jnp.zeros((N,), bool)
    if config.budget_forcing:
      window_NxC = jnp.concatenate([window_NxC[:, 1:], token_N[:, None]], axis=-1)
      closes_N = live_N & ~answer_phase_N & jnp.all(window_NxC == tag_C[None, :], axis=-1)
      answer_phase_N = answer_phase_N | closes_N
      answer_start_N = jnp.where(closes_N, i + 1, answer_start_N)
      budget_done_N = live_N & answer_phase_N & (i + 1 - answer_start_N >= config.answer_budget)

    def put(buffer_NxT, column_N):
      return jax.lax.dynamic_update_slice_in_dim(buffer_NxT, column_N[:, None].astype(buffer_NxT.dtype), i, axis=1)

    return _DecodeState(
      step=i + 1,
      fed_N=token_N,
      cache=cache,
      tokens_NxT=put(state.tokens_NxT, token_N),
      logp_NxT=put(state.logp_NxT, logp_N),
      model_logp_NxT=put(state.model_logp_NxT, model_logp_N),
      forced_mask_NxT=put(state.forced_mask_NxT, forced_N),
      done_N=state.done_N | stop_N | budget_done_N,
      stopped_N=state.stopped_N | stop_N,
      lengths_N=jnp.where(live_N, i + 1, state.lengths_N),
      answer_phase_N=answer_phase_N,
      answer_start_N=answer_start_N,
      window_NxC=window_NxC,
    )

  init = _DecodeState(
    step=jnp.int32(0),
    fed_N=jnp.full((N,), config.pad_id, jnp.int32),  # replaced by token 0 (from the prefill's logits) before the loop
    cache=cache,
    tokens_NxT=jnp.full((N, T), config.pad_id, jnp.int32),
    logp_NxT=jnp.zeros((N, T), jnp.float32),
    model_logp_NxT=jnp.zeros((N, T), jnp.float32),
    forced_mask_NxT=jnp.zeros((N, T), bool),
    done_N=jnp.zeros((N,), bool),
    stopped_N=jnp.zeros((N,), bool),
    lengths_N=jnp.zeros((N,), jnp.int32),
    answer_phase_N=jnp.full((N,), not config.budget_forcing),
    answer_start_N=jnp.zeros((N,), jnp.int32),
    window_NxC=jnp.full((N, tag_C.shape[0]), -1, jnp.int32),
  )
  final = jax.lax.while_loop(cond, body, advance(init, first_logits_NxV, cache))

  mask_NxT = slots_T[None, :] < final.lengths_N[:, None]
  answer_NxT = mask_NxT & (slots_T[None, :] >= final.answer_start_N[:, None]) & final.answer_phase_N[:, None]
  return Rollout(
    prompt_tokens_NxP=prompt_tokens_NxP,
    prompt_mask_NxP=prompt_mask_NxP,
    tokens_NxT=final.tokens_NxT,
    logp_NxT=final.logp_NxT,
    model_logp_NxT=final.model_logp_NxT,
    mask_NxT=mask_NxT,
    forced_mask_NxT=final.forced_mask_NxT,
    rationale_mask_NxT=mask_NxT & ~answer_NxT,
    answer_mask_NxT=answer_NxT,
    lengths_N=final.lengths_N,
    answer_start_N=jnp.where(final.answer_phase_N, final.answer_start_N, final.lengths_N),
    closed_N=final.answer_phase_N & config.budget_forcing,
    forced_N=jnp.any(final.forced_mask_NxT, axis=-1),
    truncated_N=~final.stopped_N,
    num_steps=final.step,
  )


generate = jax.jit(generate_impl, static_argnames=("graphdef", "config"))
generate.__doc__ = """Samples `config.num_samples` completions for each of B prompts (jitted; spec §1.6-§1.7).

Args:
  graphdef, params: `nnx.split(model)`; params may be sharded over a mesh, and the prompt batch over its data axis.
  prompt_tokens_BxP: int prompt ids, padded anywhere (left or right) to a common length P (see `pad_prompts`).
  prompt_mask_BxP: True on real prompt tokens; every prompt needs at least one.
  key: PRNG key; the same key gives the same samples.
  config: static `SamplingConfig`.
  prompt_of_R: optional int indices in [0, B), one per request: request r continues prompt row prompt_of_R[r], so
    a prompt asked for several times is prefilled once (`Sampler` builds it from duplicate prompts). Default: the
    B prompt rows are the B requests.

Returns:
  A `Rollout` with N = R*G rows (R = B without `prompt_of_R`; row r*G + g is sample g of request r) and a
  completion buffer of `config.completion_len` tokens.
"""


# ------------------------------------------------------------------------------------------------ host helpers


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> int:
  """The smallest bucket >= length (so jit sees a handful of prompt shapes)."""
  for bucket in sorted(buckets):
    if bucket >= length:
      return int(bucket)
  raise ValueError(f"Prompt length {length} exceeds the largest bucket {max(buckets)}; pass larger "
                   "prompt_buckets or truncate the prompts.")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *, buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                side: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """Pads ragged token-id lists to a bucketed length; returns `(tokens_BxP, mask_BxP)` as numpy arrays."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
  if not prompts:
    raise ValueError("pad_prompts got no prompts; pass at least one token-id list.")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise ValueError(f"Prompt {lengths.index(0)} is empty; every prompt needs at least one token (add a BOS).")
  P = bucket_length(max(lengths), buckets)
  tokens_BxP = np.full((len(prompts), P), pad_id, np.int32)
  mask_BxP = np.zeros((len(prompts), P), bool)
  for b, ids in enumerate(prompts):
    span = slice(P - len(ids), P) if side == "left" else slice(0, len(ids))
    tokens_BxP[b, span] = ids
    mask_BxP[b, span] = True
  return tokens_BxP, mask_BxP


def unique_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], np.ndarray]:
  """Distinct prompts (first-seen order) padded with repeats of the first to a power of two, and for each request
  the index of its prompt: `(rows, prompt_of_R)` for `generate`'s shared prefill."""
  index: dict[tuple[int, ...], int] = {}
  prompt_of_R = np.asarray([index.setdefault(tuple(int(t) for t in ids), len(index)) for ids in prompts], np.int32)
  rows = [list(ids) for ids in index]
  padded = 1 << max(len(rows) - 1, 0).bit_length()  # the next power of two: few compiled prefill shapes
  return rows + [rows[0]] * (padded - len(rows)), prompt_of_R


@dataclasses.dataclass(frozen=True)
class TextSamples:
  """Text-level output: `completions[b][g]` is sample g of prompt b, decoded without special tokens."""
  completions: list[list[str]]
  rollout: Rollout


class Sampler:
  """Text-level convenience: prompts as strings (optionally through the chat template), completions as strings.

  The model's graph is split once; `params` can be swapped per call (the trainer passes its current params). One
  jitted `generate` is compiled per prompt bucket. With `share_prefill` (default) a prompt that occurs several times
  in one call is prefilled once and its KV cache shared by all its requests; the distinct prompts are padded up to a
  power of two (a handful of compiled shapes). The samples are the same as without sharing (same key, same rows).
  """

  def __init__(self, model: nnx.Module, tokenizer: Any, config: SamplingConfig, *,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, chat_template: bool = False,
               padding_side: str = "left", share_prefill: bool = True):
    self.share_prefill = share_prefill
    self.graphdef, self.params = nnx.split(model)
    self.tokenizer = tokenizer
    self.config = config
    self.prompt_buckets = tuple(prompt_buckets)
    self.chat_template = chat_template
    self.padding_side = padding_side
    # One jitted wrapper; a call with and one without `prompt_of_R` are traced (and cached) separately.
    self._generate = jax.jit(functools.partial(generate_impl, self.graphdef, config=config))

  def encode(self, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, through the chat template (user turn + generation prompt) when enabled."""
    if isinstance(prompts, str):
      raise ValueError("Sampler expects a list of prompt strings, got a single string; wrap it in a list.")
    if self.chat_template:
      if getattr(self.tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template; set chat_template=False or "
                         "load a tokenizer that ships one.")
      texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False) for p in prompts]
      return self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
    return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

  def sample_ids(self, prompt_ids: Sequence[Sequence[int]], key: Array, params: Any = None) -> Rollout:
    """Samples G completions per request; a prompt repeated in the batch is prefilled once (`share_prefill`)."""
    params = self.params if params is None else params
    rows, prompt_of_R = unique_prompts(prompt_ids) if self.share_prefill else (list(prompt_ids), None)
    if prompt_of_R is not None and len(rows) >= len(prompt_ids):
      rows, prompt_of_R = list(prompt_ids), None  # too few repeats to save prefill rows: the plain path
    tokens_UxP, mask_UxP = pad_prompts(rows, self.config.pad_id, buckets=self.prompt_buckets,
                                       side=self.padding_side)
    return self._generate(params, tokens_UxP, mask_UxP, key, prompt_of_R=prompt_of_R)

  def decode(self, rollout: Rollout) -> list[list[str]]:
    """Completion strings per prompt, each cut at its length, special tokens skipped."""
    tokens_NxT = np.asarray(rollout.tokens_NxT)
    lengths_N = np.asarray(rollout.lengths_N)
    texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(tokens_NxT, lengths_N)],
                                        skip_special_tokens=True)
    G = self.config.num_samples
    return [texts[b * G:(b + 1) * G] for b in range(len(texts) // G)]

  def __call__(self, prompts: Sequence[str], key: Array, params: Any = None) -> TextSamples:
    rollout = self.sample_ids(self.encode(prompts), key, params)
    return TextSamples(completions=self.decode(rollout), rollout=rollout)
