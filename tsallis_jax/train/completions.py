"""What the trainer makes of the sampler's completions: sampler settings, scored sequences, rewards (spec 1.6, 1.7).

* `sampling_config` maps a `TrainConfig` onto the sampler's static `SamplingConfig` (budget forcing with
  `</think>`: the rationale budget, the forced tag, then the answer budget).
* `teacher_forced_completion` builds, inside jit, the completion [rationale, `</think>`, gold answer] from a sampled
  rationale: one forward over [prompt, that completion] gives log p(z|x) on the rationale tokens and
  log w = log p(y*|x, z) on the gold-answer tokens (spec eq. 7), with the pathwise gradient. A rollout that sampled
  a stop token (EOS) inside its rationale ended without an answer: its z includes the stop token and its weight is
  0 (`answered_N` False, log w = -inf), since such an outcome can never produce y*.
* `exact_match_reward`: exact match against the gold answer on token ids inside jit (the sampled answer segment,
  stop token included, equals the gold answer's ids): the sampled success rate of `success.py`. Training rewards
  are strings, computed on the host (`scoring.py`; `rewards.strict_match` equals this on a word-level tokenizer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tsallis_jax.sampler import Rollout, SamplingConfig
from tsallis_jax.train.config import TrainConfig


def sampling_config(cfg: TrainConfig, *, stop_ids: tuple[int, ...], pad_id: int, close_tag_ids: tuple[int, ...],
                    evaluation: bool = False) -> SamplingConfig:
  """The sampler settings of training rollouts or (with `evaluation`) of evaluation rollouts (both chunked by
  `rollout_chunk_rows`, with the KV cache in `kv_cache_dtype`, a scanned model decoding unrolled by
  `rollout_unroll_layers`)."""
  if not close_tag_ids:
    raise ValueError("close_tag_ids is empty: training needs the rationale's closing tag (`</think>`) to separate"
                     " the rationale from the answer; use a tokenizer that has it")
  if evaluation:
    temperature, top_k, top_p, samples = cfg.eval_temperature, cfg.eval_top_k, cfg.eval_top_p, cfg.eval_num_samples
  else:
    temperature, top_k, top_p, samples = cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples
  return SamplingConfig(num_samples=samples, max_new_tokens=cfg.rollout_len(len(close_tag_ids)),
                        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                        stop_ids=tuple(int(t) for t in stop_ids), pad_id=int(pad_id),
                        close_tag_ids=tuple(int(t) for t in close_tag_ids), rationale_budget=cfg.rationale_budget,
                        answer_budget=cfg.max_answer_len, cache_dtype=cfg.kv_cache_dtype or None,
                        chunk_rows=cfg.rollout_chunk_rows or None, unroll_layers=cfg.rollout_unroll_layers)


def rationale_extent(rollout: Rollout, stop_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(keep_N, closed_N, answered_N): the leading completion tokens that form the rationale scored by log p(z|x).

  A closed row keeps its rationale and closing tag (`answer_start_N` tokens). A row that ended inside its rationale
  on a stop token (EOS before `</think>`) keeps every token, the stop token included (its probability is that of the
  outcome "no answer"), and is not `answered_N`: it has no answer, so w = p(y*|x, z) = 0. Any other unclosed row
  (none under budget forcing) keeps its tokens and gets the tag inserted.
  """
  closed_N = rollout.closed_N
  last_N = jnp.take_along_axis(rollout.tokens_NxT, jnp.maximum(rollout.lengths_N - 1, 0)[:, None], axis=1)[:, 0]
  ended_on_stop_N = (rollout.lengths_N > 0) & jnp.isin(last_N, jnp.asarray(stop_ids, jnp.int32))
  answered_N = closed_N | ~ended_on_stop_N
  keep_N = jnp.where(closed_N, rollout.answer_start_N, rollout.lengths_N)
  return keep_N, closed_N, answered_N


def teacher_forced_completion(rollout: Rollout, gold_NxA: jax.Array, gold_mask_NxA: jax.Array,
                              close_tag_ids: tuple[int, ...], stop_ids: tuple[int, ...], pad_id: int):
  """[rationale, `</think>`, gold answer] per row in the completion buffer (length T of the rollout).

  Returns (tokens_NxT, z_mask_NxT, y_mask_NxT, valid_mask_NxT, answered_N): z_mask marks the sampled rationale
  tokens scored by log p(z|x) (forced tokens excluded: they were not drawn), y_mask the gold-answer tokens scored by
  log w. A row that stopped inside its rationale keeps its stop token in z and gets neither tag nor answer; it is
  not `answered_N`, and its log w is -inf (not the empty sum 0). Gold answers are assumed left-aligned in
  `gold_NxA` (real tokens first, stop token included).
  """
  N, T = rollout.tokens_NxT.shape
  A = gold_NxA.shape[1]
  tag_Y = jnp.asarray(close_tag_ids, jnp.int32)
  Y = tag_Y.shape[0]
  keep_N, closed_N, answered_N = rationale_extent(rollout, stop_ids)
  tag_len_N = jnp.where(closed_N | ~answered_N, 0, Y)
  slots_T = jnp.arange(T, dtype=jnp.int32)[None, :]
  in_rationale_NxT = slots_T < keep_N[:, None]
  tag_pos_NxT = slots_T - keep_N[:, None]
  in_tag_NxT = (tag_pos_NxT >= 0) & (tag_pos_NxT < tag_len_N[:, None])
  answer_pos_NxT = slots_T - (keep_N + tag_len_N)[:, None]
  gold_len_N = jnp.where(answered_N, jnp.sum(gold_mask_NxA.astype(jnp.int32), axis=1), 0)
  in_answer_NxT = (answer_pos_NxT >= 0) & (answer_pos_NxT < gold_len_N[:, None])
  tag_tok_NxT = tag_Y[jnp.clip(tag_pos_NxT, 0, Y - 1)]
  gold_tok_NxT = jnp.take_along_axis(gold_NxA.astype(jnp.int32), jnp.clip(answer_pos_NxT, 0, A - 1), axis=1)
  tokens_NxT = jnp.where(in_rationale_NxT, rollout.tokens_NxT,
                         jnp.where(in_tag_NxT, tag_tok_NxT, jnp.where(in_answer_NxT, gold_tok_NxT, pad_id)))
  z_mask_NxT = in_rationale_NxT & ~rollout.forced_mask_NxT & rollout.rationale_mask_NxT
  y_mask_NxT = in_answer_NxT
  valid_NxT = in_rationale_NxT | in_tag_NxT | in_answer_NxT
  return tokens_NxT, z_mask_NxT, y_mask_NxT, valid_NxT, answered_N


def exact_match_reward(rollout: Rollout, gold_NxA: jax.Array, gold_mask_NxA: jax.Array) -> jax.Array:
  """1.0 where the sampled answer segment equals the gold answer token for token (stop token included), else 0.

  Rows that never closed their rationale have no answer and score 0.
  """
  A = gold_NxA.shape[1]
  idx_NxA = jnp.clip(rollout.answer_start_N[:, None] + jnp.arange(A, dtype=jnp.int32)[None, :], 0,
                     rollout.tokens_NxT.shape[1] - 1)
  got_NxA = jnp.take_along_axis(rollout.tokens_NxT, idx_NxA, axis=1)
  gold_mask_NxA = gold_mask_NxA.astype(bool)
  same_N = jnp.all((got_NxA == gold_NxA) | ~gold_mask_NxA, axis=1)
  answer_len_N = jnp.sum(rollout.answer_mask_NxT.astype(jnp.int32), axis=1)
  same_len_N = answer_len_N == jnp.sum(gold_mask_NxA.astype(jnp.int32), axis=1)
  return (same_N & same_len_N & rollout.closed_N).astype(jnp.float32)
