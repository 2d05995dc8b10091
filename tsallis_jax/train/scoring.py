"""Rewards of a training rollout, on the host, between the rollout and the update (spec 1.7; issue 15).

The jitted rollout returns G completions per prompt as token ids. `rollout_rewards` decodes this process's rows
(with special tokens, as evaluation does, so `</think>` separates rationale and answer), calls each reward function
`fn(completions, records, **columns) -> list[float]` (TRL's `reward_funcs`; `tsallis_jax.rewards`: a registered name
or a dotted path `my_pkg.rewards:fn`; `columns` are the records' fields as lists), checks one finite float per
completion, sums them with `reward_weights` and returns the global array `rewards_BxG` that the jitted step reads
(GRPO and weights="reward" train on it; the likelihood weights ignore it; every estimator logs reward/* from it).

Multi-process: each process scores only the rows it holds (`distributed.host_batch_slice` of the N = B*G rollout
rows, which are exactly its prompts' G samples) and the global array is assembled from the processes' rows, so no
process decodes another's completions. Everything per token stays in jit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from tsallis_jax import distributed
from tsallis_jax import rewards as rewards_lib
from tsallis_jax.data.records import Record
from tsallis_jax.sampler import Rollout
from tsallis_jax.train import evaluate as eval_lib
from tsallis_jax.train.config import TrainConfig, reward_func_names, reward_weight_values
from tsallis_jax.train.step import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class RewardFuncs:
  """The training reward: functions `(completions, records, **columns) -> list[float]` and their weights."""
  funcs: tuple[rewards_lib.RewardFunc, ...]
  weights: tuple[float, ...]

  @classmethod
  def from_config(cls, cfg: TrainConfig) -> "RewardFuncs":
    """`cfg.reward_funcs` resolved (user modules imported: a missing one raises `rewards.RewardFuncError` now, not
    at the first step) with `cfg.reward_weights`."""
    return cls(tuple(rewards_lib.get_reward_func(name) for name in reward_func_names(cfg)),
               tuple(reward_weight_values(cfg)))

  def __call__(self, completions: Sequence[str], records: Sequence[Record]) -> np.ndarray:
    """The weighted sum of every function's checked rewards, float32, one per completion."""
    total = np.zeros(len(completions), np.float64)
    for fn, weight in zip(self.funcs, self.weights):
      total += weight * np.asarray(rewards_lib.call_reward_func(fn, completions, records), np.float64)
    return total.astype(np.float32)


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
  """Rows `rows` of a global array whose leading axis is sharded, read from this process's shards only."""
  out = np.empty((rows.stop - rows.start, *x.shape[1:]), x.dtype)
  filled = np.zeros(rows.stop - rows.start, bool)
  for shard in x.addressable_shards:
    index = shard.index[0] if shard.index else slice(None)
    start, stop, _ = index.indices(x.shape[0])
    lo, hi = max(start, rows.start), min(stop, rows.stop)
    if lo < hi:
      out[lo - rows.start:hi - rows.start] = np.asarray(shard.data)[lo - start:hi - start]
      filled[lo - rows.start:hi - rows.start] = True
  if not filled.all():
    raise ValueError(f"rows {rows} of an array of shape {x.shape} are not all on this process's devices")
  return out


def rollout_rewards(reward_funcs: RewardFuncs, rollout: Rollout, records: Sequence[Record], tokenizer: Any,
                    mesh: Mesh, global_batch: int) -> jax.Array:
  """The global `rewards_BxG` of a training rollout; `records` are this process's prompts, in batch order."""
  rows_B = distributed.host_batch_slice(global_batch, mesh, BATCH_AXES)
  if rows_B.stop - rows_B.start != len(records):
    raise ValueError(f"{len(records)} records for this process's {rows_B.stop - rows_B.start} prompt rows")
  num_rows = rollout.tokens_NxT.shape[0]
  G = num_rows // global_batch
  rows_N = slice(rows_B.start * G, rows_B.stop * G)
  completions = eval_lib.decode_completions(tokenizer, local_rows(rollout.tokens_NxT, rows_N),
                                            local_rows(rollout.lengths_N, rows_N))
  rewards_N = reward_funcs(completions, [r for r in records for _ in range(G)])
  local = {"rewards_BxG": rewards_N.reshape(len(records), G)}
  return distributed.global_batch_from_local(local, mesh, {"rewards_BxG": PartitionSpec(BATCH_AXES)},
                                             global_batch)["rewards_BxG"]
