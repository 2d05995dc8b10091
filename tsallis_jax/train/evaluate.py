"""Evaluation as the paper does it (spec 1.7): 16 samples per prompt with their own sampling settings, answers scored
by substring match against the gold answer (`eval_reward`, a name in `tsallis_jax.rewards`), reported as p@1 (mean
single-sample accuracy), pass@16 (unbiased pass@k) and maj@16 (the majority answer over the 16 samples is correct),
by `tsallis_jax.metrics.eval_metrics`.

Each prompt's samples come from one rollout (prefill once). A completion is decoded with its special tokens, so
`rewards.extract_answer` finds the text after `</think>`; a sample that never closed its rationale has no answer.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from tsallis_jax import metrics as metrics_lib
from tsallis_jax import rewards as rewards_lib
from tsallis_jax.data import prompts as prompts_lib
from tsallis_jax.data.records import Record


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host (an all-gather across processes when it is not fully addressable)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prompt_arrays(records: Sequence[Record], tokenizer: Any, *, style: str, max_prompt_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt ids of `records` at the fixed length `max_prompt_len` (one shape bucket)."""
  rows = []
  for record in records:
    ids, _ = prompts_lib.prompt_ids(record, tokenizer, style=style, max_prompt_tokens=max_prompt_len)
    if len(ids) > max_prompt_len:
      raise ValueError(f"{record.where()}: the prompt has {len(ids)} tokens after context truncation, over"
                       f" max_prompt_len={max_prompt_len}; raise max_prompt_len")
    rows.append(ids)
  return prompts_lib.pad_rows(rows, max_prompt_len, pad_id, side="left")


def decode_completions(tokenizer: Any, tokens_NxT: np.ndarray, lengths_N: np.ndarray) -> list[str]:
  """Completion texts with special tokens kept (`</think>` separates rationale and answer)."""
  rows = [row[:n].tolist() for row, n in zip(tokens_NxT, lengths_N)]
  return tokenizer.batch_decode(rows, skip_special_tokens=False)


def evaluate(rollout_fn: Callable, params: Any, records: Sequence[Record], tokenizer: Any, *, style: str,
             max_prompt_len: int, pad_id: int, batch_size: int, num_samples: int, key: jax.Array,
             put: Callable[[dict], dict], reward_name: str = "substring_match"
             ) -> tuple[dict[str, float], list[list[str]]]:
  """Samples `num_samples` completions for every record and scores them (`metrics.eval_metrics`).

  `rollout_fn(params, prompt_tokens_BxP, prompt_mask_BxP, key)` is the jitted evaluation sampler; `put` places a dict
  of host arrays on the mesh. The last batch is padded with repeats of the first record and the extra rows ignored.
  Returns (metrics without the "eval/" prefix, completions). When the records come from more than one `dataset`, the
  metrics of each also appear under `<last part of the dataset name>/` (the buckets of a synthetic `ChainMix`).
  """
  tokens, mask = prompt_arrays(records, tokenizer, style=style, max_prompt_len=max_prompt_len, pad_id=pad_id)
  predictions: list[list[str]] = []
  for start in range(0, len(records), batch_size):
    stop = min(start + batch_size, len(records))
    idx = np.arange(start, start + batch_size)
    idx[idx >= stop] = start
    batch = put({"prompt_tokens_BxP": tokens[idx], "prompt_mask_BxP": mask[idx]})
    rollout = rollout_fn(params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"],
                         jax.random.fold_in(key, start))
    answers = decode_completions(tokenizer, to_host(rollout.tokens_NxT), to_host(rollout.lengths_N))
    for b in range(stop - start):
      predictions.append(answers[b * num_samples:(b + 1) * num_samples])
  metrics = metrics_lib.eval_metrics(predictions, list(records), reward_name=reward_name, k=num_samples)
  out = {k.removeprefix("eval/"): v for k, v in metrics.items()}
  groups = sorted({r.dataset for r in records})
  if len(groups) > 1:  # e.g. the difficulty buckets of a synthetic ChainMix: `hard/p@1`, ...
    for group in groups:
      rows = [i for i, r in enumerate(records) if r.dataset == group]
      sub = metrics_lib.eval_metrics([predictions[i] for i in rows], [records[i] for i in rows],
                                     reward_name=reward_name, k=num_samples)
      out.update({f"{group.split('/')[-1]}/{k.removeprefix('eval/')}": v for k, v in sub.items()})
  return out, predictions


def completion_rows(records: Sequence[Record], completions: Sequence[Sequence[str]], *, reward_name: str,
                    max_prompts: int) -> list[dict[str, Any]]:
  """The first `max_prompts` records' sampled completions as rows for `MetricWriter.completions`: id, sample index,
  completion text, extracted answer, its reward under `reward_name` and the gold answer."""
  pairs = [(r, j, c) for r, row in zip(records[:max_prompts], completions[:max_prompts]) for j, c in enumerate(row)]
  if reward_name in rewards_lib.REWARDS:
    extract = rewards_lib.get_extractor(reward_name)
    reward = rewards_lib.get_reward(reward_name)
    scores = [float(reward(c, r)) for r, _, c in pairs]
  else:  # a user's batched reward function `module:fn`, called as in training
    extract = rewards_lib.extract_answer
    scores = rewards_lib.call_reward_func(rewards_lib.get_reward_func(reward_name), [c for _, _, c in pairs],
                                          [r for r, _, _ in pairs])
  return [{"id": r.id, "sample": j, "completion": c, "answer": extract(c), "reward": float(score), "gold": r.answer}
          for (r, j, c), score in zip(pairs, scores)]
