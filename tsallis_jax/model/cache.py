"""The key/value cache the sampler threads through decoding, and the mask/position helpers for padded batches
(with the attention pattern of packed prompt groups, `PromptGroupMask`).

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
  """Key and value buffers for every layer (a pytree), in one of two layouts (`ModelConfig.scan_layers`):

  * stacked (scanned layers): `k` and `v` are each one LxNxKxSxE array, carried through the scan over layers;
  * per layer (unrolled layers): `k` and `v` are tuples of L buffers, `k[l]` NxKxSxE (the leaves are the 2L buffers).

  KV-head major: each (row, kv head) reads one contiguous SxE slab, the layout of the batched attention dots, so
  XLA copies no cache at a decode step (the slot-major NxSxKxE layout cost a full cache transpose per step on CPU).
  """
  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]

  @property
  def stacked(self) -> bool:
    """True for the LxNxKxSxE layout of scanned layers, False for a tuple of per-layer buffers."""
    return not isinstance(self.k, (tuple, list))

  @property
  def num_layers(self) -> int:
    return self.k.shape[0] if self.stacked else len(self.k)

  @property
  def batch_axis(self) -> int:
    """The rows' axis in every buffer: 1 when stacked (LxNxKxSxE), 0 per layer (NxKxSxE)."""
    return 1 if self.stacked else 0

  @property
  def logical_axes(self) -> tuple[str, ...]:
    """Each buffer's logical axes (for `constrain`): `CACHE_LOGICAL_AXES`, after "layers" when stacked."""
    return ("layers", *CACHE_LOGICAL_AXES) if self.stacked else CACHE_LOGICAL_AXES

  @property
  def max_len(self) -> int:
    return self.k.shape[-2] if self.stacked else self.k[0].shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1] if self.stacked else self.k[0].shape[0]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """Zero buffers for `batch_size` rows of `max_len` slots (S) for every layer, in the layout of `cfg.scan_layers`."""
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"init_cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}.")
  return _zero_buffers(cfg, batch_size, max_len, dtype)


def _zero_buffers(cfg: ModelConfig, batch_size: int, max_len: int, dtype) -> KVCache:
  shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
  if cfg.scan_layers:
    return KVCache(k=jnp.zeros((cfg.num_layers, *shape), dtype), v=jnp.zeros((cfg.num_layers, *shape), dtype))
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptGroupMask:
  """The attention pattern of B packed rows [prompt b, its G completions] (`shared_prompt.completion_hidden`).

  Packed row b holds L = P + G*T tokens: prompt b's P tokens, then completions b*G .. b*G + G-1 (T tokens each).
  Passed to `Transformer.hidden` as the attention mask of tokens BxL, it makes every projection one product over the
  B*L rows, while attention runs per part: the prompt over itself (`prompt_BxPxP`), and completion n = b*G + g over
  [prompt b, itself] (`comp_NxTxS`, S = P + T, the full sequence's mask rows P..P+T-1), never over the group's
  other completions. B, P, G and T are read from the two masks' shapes.
  """
  prompt_BxPxP: jax.Array
  comp_NxTxS: jax.Array

  @property
  def shape_BxPxGxT(self) -> tuple[int, int, int, int]:
    b, p = self.prompt_BxPxP.shape[:2]
    n, t = self.comp_NxTxS.shape[:2]
    return b, p, n // b, t


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
