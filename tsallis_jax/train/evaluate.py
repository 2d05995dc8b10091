"""Evaluation as the paper does it (spec 1.7): 16 samples per prompt with their own sampling settings, answers scored
by substring match against the gold answer, reported as p@1 (mean single-sample accuracy), pass@16 (unbiased
pass@k with n = k = 16: any sample correct) and maj@16 (the majority answer over the 16 samples is correct).

Each prompt's G samples come from one rollout (prefill once); the answer of a sample is its answer segment (the
tokens after `</think>`) decoded without special tokens. A sample that never closed its rationale has no answer.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np

from tsallis_jax.data import prompts as prompts_lib
from tsallis_jax.data.records import Record


def normalize(text: str) -> str:
  """Lower case, collapsed whitespace (the vote groups answers that differ only in spacing or case)."""
  return re.sub(r"\s+", " ", text.strip().lower())


def is_correct(prediction: str, record: Record) -> bool:
  """Substring match (spec 1.7) at word boundaries: some gold answer (or alias), normalised, occurs in the normalised
  prediction as whole words ("5 8" matches "5 8" and "it is 5 8", not "15 8"; "paris" matches "paris, france")."""
  pred = f" {normalize(prediction)} "
  return bool(pred.strip()) and any(f" {normalize(a)} " in pred for a in record.answers if normalize(a))


def score_samples(predictions: Sequence[Sequence[str]], records: Sequence[Record]) -> dict[str, float]:
  """p@1, pass@k and maj@k (k = samples per prompt) over prompts; `predictions[b]` are prompt b's samples."""
  if len(predictions) != len(records) or not records:
    raise ValueError(f"got {len(predictions)} prediction lists for {len(records)} records; pass one list per record")
  k = len(predictions[0])
  p1, passk, majk = [], [], []
  for preds, record in zip(predictions, records):
    correct = [is_correct(p, record) for p in preds]
    p1.append(np.mean(correct))
    passk.append(float(any(correct)))
    answered = [(normalize(p), c) for p, c in zip(preds, correct) if normalize(p)]
    if answered:
      counts = collections.Counter(a for a, _ in answered)
      best = max(counts.values())
      voted = next(a for a, _ in answered if counts[a] == best)  # ties: the earliest sample's answer wins
      majk.append(float(dict(answered)[voted]))
    else:
      majk.append(0.0)
  return {"p@1": float(np.mean(p1)), f"pass@{k}": float(np.mean(passk)), f"maj@{k}": float(np.mean(majk))}


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host (an all-gather across processes when it is not fully addressable)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prompt_arrays(records: Sequence[Record], tokenizer: Any, *, style: str, max_prompt_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt ids of `records` at the fixed length `max_prompt_len` (one shape bucket)."""
  tokens = np.full((len(records), max_prompt_len), pad_id, np.int32)
  mask = np.zeros((len(records), max_prompt_len), bool)
  for i, record in enumerate(records):
    ids, _ = prompts_lib.prompt_ids(record, tokenizer, style=style, max_prompt_tokens=max_prompt_len)
    ids = ids[-max_prompt_len:]
    tokens[i, max_prompt_len - len(ids):] = ids
    mask[i, max_prompt_len - len(ids):] = True
  return tokens, mask


def decode_answers(tokenizer: Any, tokens_NxT: np.ndarray, answer_mask_NxT: np.ndarray) -> list[str]:
  rows = [row[m.astype(bool)].tolist() for row, m in zip(tokens_NxT, answer_mask_NxT)]
  return tokenizer.batch_decode(rows, skip_special_tokens=True)


def evaluate(rollout_fn: Callable, params: Any, records: Sequence[Record], tokenizer: Any, *, style: str,
             max_prompt_len: int, pad_id: int, batch_size: int, num_samples: int, key: jax.Array,
             put: Callable[[dict], dict]) -> tuple[dict[str, float], list[list[str]]]:
  """Samples `num_samples` answers for every record and scores them (`score_samples`).

  `rollout_fn(params, prompt_tokens_BxP, prompt_mask_BxP, key)` is the jitted evaluation sampler; `put` places a dict
  of host arrays on the mesh. The last batch is padded with repeats of the first record and the extra rows ignored.
  Returns (metrics, predictions).
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
    answers = decode_answers(tokenizer, to_host(rollout.tokens_NxT), to_host(rollout.answer_mask_NxT))
    for b in range(stop - start):
      predictions.append(answers[b * num_samples:(b + 1) * num_samples])
  return score_samples(predictions, records), predictions
