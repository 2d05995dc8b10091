"""The key/value cache the sampler threads through decoding, and the mask/position helpers for padded batches.

Buffers are aligned across rows: a call writes its T new tokens at slots [i, i + T) of every row, with the same
int32 `cache_index` i for all rows. Left padding keeps prompts aligned; pad slots are masked out by the caller's
attention mask.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsallis_jax.model.config import ModelConfig

#: Logical axes of every cache buffer (for `constrain` / sharding rules), in the buffers' NxKxSxE order.
CACHE_LOGICAL_AXES = ("batch", "kv_heads", "length", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer key and value buffers, `k[l]` and `v[l]` each NxKxSxE (a pytree; leaves are the 2L buffers).

  KV-head major: each (row, kv head) reads one contiguous SxE slab, the layout of the batched attention dots, so
  XLA copies no cache at a decode step (the slot-major NxSxKxE layout cost a full cache transpose per step on CPU).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """Zero buffers for `batch_size` rows of `max_len` slots (S) for every layer."""
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"init_cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}.")
  shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def make_attention_mask(pad_mask_NxT: jax.Array) -> jax.Array:
  """Causal AND key-not-padding: `attn_mask_NxTxT[n, t, s] = s <= t and pad_mask_NxT[n, s]` (True = may attend)."""
  if pad_mask_NxT.ndim != 2:
    raise ValueError(f"make_attention_mask expects a rank-2 pad mask (rows x tokens), got shape {pad_mask_NxT.shape}.")
  pad_mask_NxT = pad_mask_NxT.astype(bool)
  t = pad_mask_NxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  return causal_TxT[None, :, :] & pad_mask_NxT[:, None, :]


def make_positions(pad_mask_NxT: jax.Array) -> jax.Array:
  """Position ids that count real tokens only: cumsum(pad_mask) - 1, clipped at 0 (pad positions are ignored)."""
  if pad_mask_NxT.ndim != 2:
    raise ValueError(f"make_positions expects a rank-2 pad mask (rows x tokens), got shape {pad_mask_NxT.shape}.")
  return jnp.maximum(jnp.cumsum(pad_mask_NxT.astype(jnp.int32), axis=1) - 1, 0)
