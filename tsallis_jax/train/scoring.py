"""Rewards of a training rollout, on the host, between the rollout and the update (spec 1.7; issue 15).

The jitted rollout returns G completions per prompt as token ids. `rollout_rewards` decodes this process's rows
(with special tokens, as evaluation does, so `</think>` separates rationale and answer), calls each reward function
`fn(completions, records, **columns) -> list[float]` (TRL's `reward_funcs`; `tsallis_jax.rewards`: a registered name
or a dotted path `my_pkg.rewards:fn`; `columns` are the records' fields as lists), checks one finite float per
completion, sums them with `reward_weights` and returns the global array `rewards_BxG` that the jitted step reads
(GRPO and weights="reward" train on it; the likelihood weights ignore it; every estimator logs reward/* from it).
`rollout_reward_table` also returns each function's own rewards, from which `reward_func_metrics` gives TRL's
per-function `rewards/<name>/mean` and `rewards/<name>/std`.

Multi-process: each process scores only the rows it holds (`distributed.host_batch_slice` of the N = B*G rollout
rows, which are exactly its prompts' G samples) and the global array is assembled from the processes' rows, so no
process decodes another's completions. Everything per token stays in jit.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
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

  @property
  def names(self) -> tuple[str, ...]:
    """One name per function for the logs (TRL's `reward_func.__name__`; a repeated name gets `_<index>`)."""
    raw = [getattr(fn, "__name__", "") or f"reward_{i}" for i, fn in enumerate(self.funcs)]
    return tuple(name if raw.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(raw))

  def per_func(self, completions: Sequence[str], records: Sequence[Record]) -> np.ndarray:
    """Every function's checked rewards, unweighted: float32, completions x functions (NxF)."""
    columns = [np.asarray(rewards_lib.call_reward_func(fn, completions, records), np.float64) for fn in self.funcs]
    return np.stack(columns, axis=1).astype(np.float32).reshape(len(completions), len(self.funcs))

  def __call__(self, completions: Sequence[str], records: Sequence[Record]) -> np.ndarray:
    """The weighted sum of every function's checked rewards, float32, one per completion."""
    return self.total(self.per_func(completions, records))

  def total(self, per_func_NxF: np.ndarray) -> np.ndarray:
    """The weighted sum over functions of a `per_func` table, float32, one per completion."""
    total = np.zeros(per_func_NxF.shape[0], np.float64)
    for f, weight in enumerate(self.weights):
      total += weight * per_func_NxF[:, f].astype(np.float64)
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
  return rollout_reward_table(reward_funcs, rollout, records, tokenizer, mesh, global_batch)[0]


def rollout_reward_table(reward_funcs: RewardFuncs, rollout: Rollout, records: Sequence[Record], tokenizer: Any,
                         mesh: Mesh, global_batch: int) -> tuple[jax.Array, jax.Array]:
  """The global `rewards_BxG` (weighted sum) and `per_func_BxGxF` (each function's own rewards, F = functions) of a
  training rollout; `records` are this process's prompts, in batch order. Each function runs once per completion."""
  rows_B = distributed.host_batch_slice(global_batch, mesh, BATCH_AXES)
  if rows_B.stop - rows_B.start != len(records):
    raise ValueError(f"{len(records)} records for this process's {rows_B.stop - rows_B.start} prompt rows")
  num_rows = rollout.tokens_NxT.shape[0]
  G = num_rows // global_batch
  rows_N = slice(rows_B.start * G, rows_B.stop * G)
  completions = eval_lib.decode_completions(tokenizer, local_rows(rollout.tokens_NxT, rows_N),
                                            local_rows(rollout.lengths_N, rows_N))
  per_func_NxF = reward_funcs.per_func(completions, [r for r in records for _ in range(G)])
  F = per_func_NxF.shape[1]
  local = {"rewards_BxG": reward_funcs.total(per_func_NxF).reshape(len(records), G),
           "per_func_BxGxF": per_func_NxF.reshape(len(records), G, F)}
  specs = {"rewards_BxG": PartitionSpec(BATCH_AXES), "per_func_BxGxF": PartitionSpec(BATCH_AXES)}
  out = distributed.global_batch_from_local(local, mesh, specs, global_batch)
  return out["rewards_BxG"], out["per_func_BxGxF"]


@functools.partial(jax.jit, static_argnames="names")
def reward_func_metrics(per_func_BxGxF: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
  """TRL's per-function metrics over the B*G completions of a step: `rewards/<name>/mean` and `rewards/<name>/std`
  (Bessel-corrected, as TRL's `nanstd`; 0 for a single completion). Jitted: the table is a global array."""
  table_NxF = per_func_BxGxF.reshape(-1, per_func_BxGxF.shape[-1]).astype(jnp.float32)
  ddof = 1 if table_NxF.shape[0] > 1 else 0
  metrics = {}
  for f, name in enumerate(names):
    metrics[f"rewards/{name}/mean"] = jnp.mean(table_NxF[:, f])
    metrics[f"rewards/{name}/std"] = jnp.std(table_NxF[:, f], ddof=ddof)
  return metrics
