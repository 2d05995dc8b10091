"""Per-prompt success probability P(y*|x) of a model, estimated as the estimators see it (spec eq. 7-8).

P(y*|x) = E_{z ~ p(z|x)}[p(y*|x, z)]: G rationales are sampled from the model (temperature 1, the same budget forcing
as training), the gold answer is teacher-forced after each, and the mean of the likelihood weights w = p(y*|x, z) over
the G samples is an unbiased estimate of the prompt's P (w = 0 for a rationale that ended with EOS before `</think>`:
it never answers). The sampled exact-match success rate comes with it.

`make_scorer` compiles the scoring once for a model and a sampling budget; `success_by_prompt` runs it over records
and returns one P-hat per record. The demo uses them for the cold-start p0 (`pretrain.measure_p0`), the per-prompt p0
histogram and the per-prompt escape analysis (the step at which each probe prompt's P-hat crosses 1/2).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tsallis_jax.data import prompts as prompts_lib
from tsallis_jax.data.records import Record
from tsallis_jax.sampler import SamplingConfig, generate_impl
from tsallis_jax.train import evaluate as eval_lib
from tsallis_jax.train import completions as completions_lib
from tsallis_jax.train import step as step_lib

Scorer = Callable[..., tuple[jax.Array, jax.Array]]


def make_scorer(graphdef: nnx.GraphDef, *, num_samples: int, rationale_budget: int, max_answer_len: int,
                stop_ids: tuple[int, ...], pad_id: int, close_tag_ids: tuple[int, ...],
                temperature: float = 1.0) -> Scorer:
  """`score(params, prompt_BxP, prompt_mask_BxP, answer_BxA, answer_mask_BxA, key) -> (w_BxG, reward_BxG)`, jitted.

  w is p(y*|x, z) of each sampled rationale (0 for a rationale that can never reach y*, see
  `completions.teacher_forced_completion`); reward is the sampled answer's exact match.
  """
  sampling = SamplingConfig(num_samples=num_samples, max_new_tokens=rationale_budget + len(close_tag_ids)
                            + max_answer_len, temperature=temperature, stop_ids=stop_ids, pad_id=pad_id,
                            close_tag_ids=close_tag_ids, rationale_budget=rationale_budget,
                            answer_budget=max_answer_len)

  ids = step_lib.TokenIds(stop_ids=stop_ids, pad_id=pad_id, close_tag_ids=close_tag_ids)

  @jax.jit
  def score(params, prompt_BxP, prompt_mask_BxP, answer_BxA, answer_mask_BxA, key):
    B = prompt_BxP.shape[0]
    rollout = generate_impl(graphdef, params, prompt_BxP, prompt_mask_BxP, key, sampling)
    gold_NxA = jnp.repeat(answer_BxA, num_samples, axis=0)
    gold_mask_NxA = jnp.repeat(answer_mask_BxA, num_samples, axis=0)
    # rows b*G + g continue prompt b: each prompt's forward runs once for its G rationales (model.shared_prompt)
    _, logw_N = step_lib.teacher_forced_scores(nnx.merge(graphdef, params), rollout, gold_NxA, gold_mask_NxA, ids,
                                               group=num_samples)
    reward_N = completions_lib.exact_match_reward(rollout, gold_NxA, gold_mask_NxA)
    w_N = jnp.exp(logw_N)  # EOS inside the rationale: no answer, log w = -inf, w = 0
    return w_N.reshape(B, num_samples), reward_N.reshape(B, num_samples)

  return score


def answer_arrays(records: Sequence[Record], tokenizer: Any, *, max_answer_len: int,
                  style: prompts_lib.Style = "cold") -> tuple[np.ndarray, np.ndarray]:
  """Right-padded gold answer ids (EOS included, as the train step teacher-forces them) and their mask."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  rows = [prompts_lib.gold_answer_ids(record, tokenizer, style=style) for record in records]
  for record, ids in zip(records, rows):
    if len(ids) > max_answer_len:
      raise ValueError(f"{record.where()}: the gold answer has {len(ids)} tokens (EOS included), over "
                       f"max_answer_len={max_answer_len}; raise max_answer_len")
  return prompts_lib.pad_rows(rows, max_answer_len, pad, side="right")


def success_by_prompt(score: Scorer, params: Any, records: Sequence[Record], tokenizer: Any, *, key: jax.Array,
                      max_prompt_len: int, max_answer_len: int, batch_size: int = 64,
                      style: prompts_lib.Style = "cold") -> dict[str, np.ndarray]:
  """`{"p_hat": mean w per record, "sampled": exact-match rate per record}` (arrays over `records`, in order).

  Batches have the fixed shape `batch_size` x `max_prompt_len` (one compiled program); the last batch is padded
  with repeats of its first record, whose extra rows are dropped.
  """
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  prompt_BxP, prompt_mask_BxP = eval_lib.prompt_arrays(records, tokenizer, style=style,
                                                       max_prompt_len=max_prompt_len, pad_id=pad)
  answer_BxA, answer_mask_BxA = answer_arrays(records, tokenizer, max_answer_len=max_answer_len, style=style)
  p_hat, sampled = [], []
  for start in range(0, len(records), batch_size):
    stop = min(start + batch_size, len(records))
    idx = np.arange(start, start + batch_size)
    idx[idx >= stop] = start
    w_BxG, r_BxG = score(params, prompt_BxP[idx], prompt_mask_BxP[idx], answer_BxA[idx], answer_mask_BxA[idx],
                         jax.random.fold_in(key, start))
    p_hat.append(np.asarray(w_BxG, np.float64).mean(axis=1)[:stop - start])
    sampled.append(np.asarray(r_BxG, np.float64).mean(axis=1)[:stop - start])
  return {"p_hat": np.concatenate(p_hat), "sampled": np.concatenate(sampled)}
