"""Sampling metrics: p@1, unbiased pass@k, maj@k, and the eval/* batch helper (issue 6; spec 1.7).

* `p_at_1`: the mean over problems and samples of per-sample correctness (single-sample accuracy).
* `pass_at_k(n, c, k)`: the unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that k samples drawn without
  replacement from the n include a correct one, computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (no factorials:
  stable for n in the thousands).
* `maj_at_k(answers, is_correct_fn, k, normalize)`: majority vote over the first k extracted answers, each counted
  under `normalize`; empty answers (no `</think>`) do not vote. **Tie-break**: among the keys with the most votes,
  the one whose first occurrence comes earliest wins (deterministic, independent of hashing). The voted answer is
  the first original answer with the winning key; it is scored with `is_correct_fn`. No votes scores 0.
* `eval_metrics(completions, records, reward_name, k)`: the paper's eval/p@1, eval/pass@k (the paper's p@16) and
  eval/maj@k (m@16) for [B][n] completions, correct meaning reward > 0.5.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from tsallis_jax import rewards as rewards_lib
from tsallis_jax.data.records import Record


def p_at_1(correct_BxN: np.ndarray) -> float:
  """Mean per-sample correctness (booleans or scores in [0, 1])."""
  correct_BxN = np.asarray(correct_BxN, dtype=np.float64)
  if correct_BxN.ndim != 2 or correct_BxN.size == 0:
    raise ValueError(f"p_at_1 expects a non-empty [problems, samples] array, got shape {correct_BxN.shape}.")
  return float(correct_BxN.mean())


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k for one problem with n samples of which c are correct (module docstring)."""
  if not (0 <= c <= n and 1 <= k <= n):
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}; draw at least k "
                     "samples per problem.")
  if n - c < k:
    return 1.0
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def majority_vote(answers: Sequence[str], normalize: Callable[[str], str]) -> str | None:
  """The answer chosen by majority (module docstring's tie-break), or None when no answer votes."""
  counts: dict[str, int] = {}
  first: dict[str, int] = {}
  for i, answer in enumerate(answers):
    key = normalize(answer) if answer else ""
    if not key:
      continue
    counts[key] = counts.get(key, 0) + 1
    first.setdefault(key, i)
  if not counts:
    return None
  winner = min(counts, key=lambda key: (-counts[key], first[key]))
  return answers[first[winner]]


def maj_at_k(answers: Sequence[str], is_correct_fn: Callable[[str], bool], k: int,
             normalize: Callable[[str], str] = rewards_lib.normalize_light) -> float:
  """1.0 if the majority answer among the first k is correct, else 0.0 (module docstring)."""
  if not 1 <= k <= len(answers):
    raise ValueError(f"maj_at_k needs 1 <= k <= len(answers), got k={k} with {len(answers)} answers.")
  voted = majority_vote(list(answers[:k]), normalize)
  return float(voted is not None and bool(is_correct_fn(voted)))


def eval_metrics(completions: Sequence[Sequence[str]], records: Sequence[Record], *,
                 reward_name: str = "substring_match", k: int = 16) -> dict[str, float]:
  """`eval/p@1`, `eval/pass@{k}`, `eval/maj@{k}` over B problems with n >= k completions each."""
  if len(completions) != len(records) or not records:
    raise ValueError(f"eval_metrics got {len(completions)} completion lists for {len(records)} records; "
                     "pass one list per record.")
  n = len(completions[0])
  if any(len(c) != n for c in completions):
    raise ValueError("eval_metrics needs the same number of completions for every record.")
  if n < k:
    raise ValueError(f"eval_metrics: {n} completions per record, fewer than k={k}; sample at least k.")
  if reward_name not in rewards_lib.REWARDS:
    return _eval_metrics_of_func(completions, records, rewards_lib.get_reward_func(reward_name), n, k)
  score = rewards_lib.get_answer_scorer(reward_name)
  normalize = rewards_lib.get_normalizer(reward_name)
  extract = rewards_lib.get_extractor(reward_name)
  answers = [[extract(c) for c in row] for row in completions]
  correct_BxN = np.array([[score(a, r) > 0.5 for a in row] for row, r in zip(answers, records)])
  pass_k = [pass_at_k(n, int(row.sum()), k) for row in correct_BxN]
  maj_k = [maj_at_k(row, lambda a, r=r: score(a, r) > 0.5, k, normalize) for row, r in zip(answers, records)]
  return {"eval/p@1": p_at_1(correct_BxN), f"eval/pass@{k}": float(np.mean(pass_k)),
          f"eval/maj@{k}": float(np.mean(maj_k))}


def _eval_metrics_of_func(completions, records, fn, n: int, k: int) -> dict[str, float]:
  """`eval_metrics` for a user's batched reward function (`module:function`): a completion is correct when its
  reward > 0.5; maj@k votes on `extract_answer` under `normalize_light` and scores the first completion that gave
  the voted answer."""
  flat = [c for row in completions for c in row]
  values = rewards_lib.call_reward_func(fn, flat, [r for r in records for _ in range(n)])
  correct_BxN = np.asarray(values).reshape(len(records), n) > 0.5
  pass_k = [pass_at_k(n, int(row.sum()), k) for row in correct_BxN]
  maj_k = []
  for row, ok_N in zip(completions, correct_BxN):
    answers = [rewards_lib.extract_answer(c) for c in row[:k]]
    voted = majority_vote(answers, rewards_lib.normalize_light)
    maj_k.append(float(voted is not None and bool(ok_N[answers.index(voted)])))
  return {"eval/p@1": p_at_1(correct_BxN), f"eval/pass@{k}": float(np.mean(pass_k)),
          f"eval/maj@{k}": float(np.mean(maj_k))}
