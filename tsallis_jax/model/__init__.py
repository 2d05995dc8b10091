"""Flax NNX decoder LM (Qwen3 / Qwen2 / Llama), sharding rules, HF and GGUF loaders, log-prob helpers.

Contract used by the sampler and the trainer:

    cfg = ModelConfig.tiny()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    cache = init_cache(cfg, batch_size=N, max_len=S, dtype=jnp.float32)
    logits_NxTxV, cache = model(tokens_NxT, positions_NxT, attn_mask_NxTxS, cache=cache, cache_index=i)

With `cfg.scan_layers=True` the layers run under a scan and the cache is stacked: `cache.k`, `cache.v` are each
LxNxKxSxE (logical axes "layers" + `CACHE_LOGICAL_AXES`); with `scan_layers=False` (the default) they are tuples of
L per-layer NxKxSxE buffers `cache.k[l]`. Either way `cache.k[l]` is layer l's NxKxSxE buffer (kv-head major), and
`cache.max_len`, `cache.batch_size`, `cache.num_layers`, `cache.batch_axis`, `cache.logical_axes` describe it;
`init_cache(cfg, ...)` builds the layout of `cfg`.
"""
from tsallis_jax.model.cache import (CACHE_LOGICAL_AXES, KVCache, PromptGroupMask, init_cache, make_attention_mask,
                                     make_positions)
from tsallis_jax.model.config import DEFAULT_SHARDING_RULES, ModelConfig
from tsallis_jax.model.sharding import constrain, logical_to_spec, param_shardings
from tsallis_jax.model.transformer import Transformer, abstract_model, create_model, unrolled
from tsallis_jax.model.logprobs import (segment_logprob, sequence_logprobs, token_logprobs,
                                        token_logprobs_from_hidden)
from tsallis_jax.model.hf_io import CheckpointError, load_hf_checkpoint, load_tokenizer, save_hf_checkpoint
from tsallis_jax.model.gguf_io import load_gguf, load_smollm2

__all__ = [
  "CACHE_LOGICAL_AXES", "DEFAULT_SHARDING_RULES", "CheckpointError", "KVCache", "ModelConfig", "PromptGroupMask",
  "Transformer", "abstract_model", "constrain", "create_model", "init_cache", "load_gguf", "load_hf_checkpoint",
  "load_smollm2",
  "load_tokenizer", "logical_to_spec", "make_attention_mask", "make_positions", "param_shardings",
  "save_hf_checkpoint", "segment_logprob", "sequence_logprobs", "token_logprobs", "token_logprobs_from_hidden",
  "unrolled",
]
