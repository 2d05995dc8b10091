"""`generate` in four stages: prefill, expand to samples, decode (one step at a time), assemble the `Rollout`.

1. `prefill`: the U prompt rows, left-aligned, go through the model once into a fresh U-row KV cache; the logits of
   the last prompt position give completion token 0.
2. `expand_to_samples`: every prompt row is copied G times (row `b*G + g` is sample g of request b; request b
   continues prompt row b, or `prompt_of_B[b]` when requests share prompts), KV cache included.
3. `next_token` records completion token i from its logits: drawn by `select_tokens`, or fed in by budget forcing
   (`force_close_tag`); `decode_step` feeds token i-1 through the model for the logits of token i. A
   `lax.while_loop` runs `decode_step` until every row is done or the buffer of T tokens is full.
4. `assemble`: the loop's buffers become the `Rollout`'s tokens, log-probs and segment masks.

With `SamplingConfig.chunk_rows`, stages 1-4 run on chunks of whole prompts one after another (`lax.map`), so the
KV cache holds one chunk's rows; the uniforms are drawn for all rows first, so the samples do not change.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tsallis_jax import model as model_lib
from tsallis_jax.model.config import ShardingRules
from tsallis_jax.sampler.config import Rollout, SamplingConfig
from tsallis_jax.sampler.select import select_tokens

Array = jax.Array


class _DecodeState(flax.struct.PyTreeNode):
  """What the decode loop carries; `window_NxY` holds each row's last Y tokens (Y = len(close_tag_ids))."""
  step: Array
  fed_N: Array
  cache: Any
  tokens_NxT: Array
  logp_NxT: Array
  model_logp_NxT: Array
  forced_mask_NxT: Array
  done_N: Array
  stopped_N: Array
  lengths_N: Array
  answer_phase_N: Array
  answer_start_N: Array
  window_NxY: Array


class _DecodeInputs(flax.struct.PyTreeNode):
  """What every decode step reads and none changes."""
  prompt_keys_NxP: Array
  prompt_len_N: Array
  uniforms_TxN: Array


# ------------------------------------------------------------------------------------------------ 1. prefill


def left_align(tokens_UxP: Array, mask_UxP: Array) -> tuple[Array, Array]:
  """Moves every row's real tokens to the end, in order (pads first): any padding becomes left padding."""
  order_UxP = jnp.argsort(mask_UxP, axis=-1, stable=True)
  return (jnp.take_along_axis(tokens_UxP, order_UxP, axis=-1),
          jnp.take_along_axis(mask_UxP, order_UxP, axis=-1))


def prefill(model: model_lib.Transformer, prompt_tokens_UxP: Array, prompt_mask_UxP: Array, cache_len: int,
            cache_dtype: jnp.dtype) -> tuple[model_lib.KVCache, Array, Array, Array]:
  """Runs the prompts through the model once into cache slots [0, P) of a fresh `cache_len`-slot cache.

  Left-aligned, every row's last prompt token sits in slot P-1, and its logits (the only ones computed over the
  prompt) give the first completion token, so decoding starts at the second token: one N-row model call fewer than
  feeding the last prompt token in the loop. Returns `(cache, last_logits_UxV, prompt_tokens_UxP, prompt_mask_UxP)`,
  the prompts left-aligned.
  """
  prompt_tokens_UxP, prompt_mask_UxP = left_align(prompt_tokens_UxP.astype(jnp.int32), prompt_mask_UxP.astype(bool))
  U, P = prompt_tokens_UxP.shape
  cache = model_lib.init_cache(model.config, batch_size=U, max_len=cache_len, dtype=cache_dtype)
  attn_UxPxS = jnp.pad(model_lib.make_attention_mask(prompt_mask_UxP), ((0, 0), (0, 0), (0, cache_len - P)))
  hidden_UxPxD, cache = model.hidden(prompt_tokens_UxP, model_lib.make_positions(prompt_mask_UxP), attn_UxPxS,
                                     cache=cache, cache_index=jnp.int32(0))
  last_logits_UxV = model.logits(hidden_UxPxD[:, -1:])[:, 0].astype(jnp.float32)  # the LM head on one position
  return cache, last_logits_UxV, prompt_tokens_UxP, prompt_mask_UxP


# ------------------------------------------------------------------------------------------------ 2. expand


def expand_to_samples(x_Ux: Array, num_samples: int, prompt_of_B: Array | None, axis: int = 0) -> Array:
  """Row n = b*G + g continues prompt row b (or prompt_of_B[b]): prefilled rows are copied, never recomputed.

  The rows are `x`'s axis `axis` (0, or 1 for a stacked LxNxKxSxE cache buffer).
  """
  if prompt_of_B is None:  # the trainer's case; a repeat keeps the rows' batch sharding under a mesh
    return jnp.repeat(x_Ux, num_samples, axis=axis)
  return jnp.take(x_Ux, jnp.repeat(prompt_of_B.astype(jnp.int32), num_samples, axis=0), axis=axis)


def expand_cache(cache: model_lib.KVCache, num_samples: int, prompt_of_B: Array | None,
                 rules: ShardingRules) -> model_lib.KVCache:
  """`expand_to_samples` on every cache buffer's rows (axis 1 when stacked LxNxKxSxE), kept batch-sharded under a
  mesh (a no-op without one)."""
  rows, axis = cache.batch_size, cache.batch_axis
  for buffer in jax.tree.leaves(cache):
    if buffer.ndim <= axis or buffer.shape[axis] != rows:
      raise ValueError(f"KV-cache leaf of shape {buffer.shape} does not hold the batch size {rows} on axis {axis}; "
                       "the sampler repeats cache rows per sample and needs every cache leaf's rows on that axis.")
  cache = jax.tree.map(lambda x: expand_to_samples(x, num_samples, prompt_of_B, axis), cache)
  return jax.tree.map(lambda x: model_lib.constrain(x, cache.logical_axes, rules), cache)


# ------------------------------------------------------------------------------------------------ 3. decode


def _is_any(token_N: Array, ids: tuple[int, ...]) -> Array:
  """token_N is one of `ids` (never, for no ids)."""
  return jnp.any(token_N[:, None] == jnp.asarray(ids or (-1,), jnp.int32)[None, :], axis=-1)


def _write_column(buffer_NxT: Array, column_N: Array, i: Array) -> Array:
  return jax.lax.dynamic_update_slice_in_dim(buffer_NxT, column_N[:, None].astype(buffer_NxT.dtype), i, axis=1)


def force_close_tag(i: Array, answer_phase_N: Array, token_N: Array, logp_N: Array, config: SamplingConfig
                    ) -> tuple[Array, Array, Array]:
  """Budget forcing (spec §1.7, s1-style): a row still in its rationale at completion positions
  [rationale_budget, rationale_budget + Y) is fed the closing tag's tokens there, with log-prob 0 (not drawn).

  Returns `(token_N, logp_N, forced_N)`.
  """
  tag_Y = jnp.asarray(config.close_tag_ids, jnp.int32)
  tag_index = i - config.rationale_budget
  in_tag_window = (tag_index >= 0) & (tag_index < tag_Y.shape[0])
  forced_N = ~answer_phase_N & in_tag_window
  forced_token = tag_Y[jnp.clip(tag_index, 0, tag_Y.shape[0] - 1)]
  return jnp.where(forced_N, forced_token, token_N), jnp.where(forced_N, 0.0, logp_N), forced_N


def next_token(state: _DecodeState, logits_NxV: Array, cache: Any, uniforms_TxN: Array, config: SamplingConfig
               ) -> _DecodeState:
  """Chooses completion token i = state.step from its logits (drawn, or forced by budget forcing), records it
  with its two log-probs, and marks the rows it ends (stop token, answer budget spent)."""
  i = state.step
  N = logits_NxV.shape[0]
  token_N, logp_N, log_z_N = select_tokens(uniforms_TxN[i], logits_NxV, config)
  forced_N = jnp.zeros((N,), bool)
  if config.budget_forcing:
    token_N, logp_N, forced_N = force_close_tag(i, state.answer_phase_N, token_N, logp_N, config)

  inv_temperature = 1.0 / config.temperature if config.temperature > 0 else 1.0
  model_logp_N = (jnp.take_along_axis(logits_NxV, token_N[:, None], axis=-1)[:, 0] * inv_temperature - log_z_N)
  if config.temperature > 0 and not config.filtered:  # the same number: reuse it (the first gather is dead code)
    logp_N = jnp.where(forced_N, 0.0, model_logp_N)

  live_N = ~state.done_N
  token_N = jnp.where(live_N, token_N, config.pad_id)
  logp_N = jnp.where(live_N, logp_N, 0.0)
  model_logp_N = jnp.where(live_N, model_logp_N, 0.0)
  forced_N = forced_N & live_N

  stop_N = live_N & _is_any(token_N, config.stop_ids)
  answer_phase_N, answer_start_N, window_NxY = state.answer_phase_N, state.answer_start_N, state.window_NxY
  budget_done_N = jnp.zeros((N,), bool)
  if config.budget_forcing:  # a row switches to its answer when its last Y tokens are the tag (sampled or forced)
    window_NxY = jnp.concatenate([window_NxY[:, 1:], token_N[:, None]], axis=-1)
    tag_Y = jnp.asarray(config.close_tag_ids, jnp.int32)
    closes_N = live_N & ~answer_phase_N & jnp.all(window_NxY == tag_Y[None, :], axis=-1)
    answer_phase_N = answer_phase_N | closes_N
    answer_start_N = jnp.where(closes_N, i + 1, answer_start_N)
    budget_done_N = live_N & answer_phase_N & (i + 1 - answer_start_N >= config.answer_budget)

  return _DecodeState(
    step=i + 1,
    fed_N=token_N,
    cache=cache,
    tokens_NxT=_write_column(state.tokens_NxT, token_N, i),
    logp_NxT=_write_column(state.logp_NxT, logp_N, i),
    model_logp_NxT=_write_column(state.model_logp_NxT, model_logp_N, i),
    forced_mask_NxT=_write_column(state.forced_mask_NxT, forced_N, i),
    done_N=state.done_N | stop_N | budget_done_N,
    stopped_N=state.stopped_N | stop_N,
    lengths_N=jnp.where(live_N, i + 1, state.lengths_N),
    answer_phase_N=answer_phase_N,
    answer_start_N=answer_start_N,
    window_NxY=window_NxY,
  )


def decode_step(model: model_lib.Transformer, state: _DecodeState, inputs: _DecodeInputs, config: SamplingConfig
                ) -> _DecodeState:
  """Feeds completion token i-1 (i = state.step) into cache slot P-1+i and records token i from its logits."""
  i = state.step
  N, T = state.tokens_NxT.shape
  P = inputs.prompt_keys_NxP.shape[1]
  slots_T = jnp.arange(T, dtype=jnp.int32)
  attn_Nx1xS = jnp.concatenate([inputs.prompt_keys_NxP, jnp.broadcast_to(slots_T < i, (N, T))], axis=-1)[:, None, :]
  positions_Nx1 = (inputs.prompt_len_N - 1 + i)[:, None]
  logits_Nx1xV, cache = model(state.fed_N[:, None], positions_Nx1, attn_Nx1xS, cache=state.cache,
                              cache_index=P - 1 + i)
  return next_token(state, logits_Nx1xV[:, 0].astype(jnp.float32), cache, inputs.uniforms_TxN, config)


def _initial_state(cache: Any, N: int, T: int, config: SamplingConfig) -> _DecodeState:
  return _DecodeState(
    step=jnp.int32(0),
    fed_N=jnp.full((N,), config.pad_id, jnp.int32),  # replaced by token 0 (from the prefill's logits) before the loop
    cache=cache,
    tokens_NxT=jnp.full((N, T), config.pad_id, jnp.int32),
    logp_NxT=jnp.zeros((N, T), jnp.float32),
    model_logp_NxT=jnp.zeros((N, T), jnp.float32),
    forced_mask_NxT=jnp.zeros((N, T), bool),
    done_N=jnp.zeros((N,), bool),
    stopped_N=jnp.zeros((N,), bool),
    lengths_N=jnp.zeros((N,), jnp.int32),
    answer_phase_N=jnp.full((N,), not config.budget_forcing),
    answer_start_N=jnp.zeros((N,), jnp.int32),
    window_NxY=jnp.full((N, max(len(config.close_tag_ids), 1)), -1, jnp.int32),
  )


# ------------------------------------------------------------------------------------------------ 4. assemble


def assemble(final: _DecodeState, prompt_tokens_NxP: Array, prompt_mask_NxP: Array, config: SamplingConfig
             ) -> Rollout:
  """The `Rollout` from the decode loop's final state: segment masks from the lengths and answer starts."""
  T = final.tokens_NxT.shape[1]
  slots_T = jnp.arange(T, dtype=jnp.int32)
  mask_NxT = slots_T[None, :] < final.lengths_N[:, None]
  answer_NxT = mask_NxT & (slots_T[None, :] >= final.answer_start_N[:, None]) & final.answer_phase_N[:, None]
  return Rollout(
    prompt_tokens_NxP=prompt_tokens_NxP,
    prompt_mask_NxP=prompt_mask_NxP,
    tokens_NxT=final.tokens_NxT,
    logp_NxT=final.logp_NxT,
    model_logp_NxT=final.model_logp_NxT,
    mask_NxT=mask_NxT,
    forced_mask_NxT=final.forced_mask_NxT,
    rationale_mask_NxT=mask_NxT & ~answer_NxT,
    answer_mask_NxT=answer_NxT,
    lengths_N=final.lengths_N,
    answer_start_N=jnp.where(final.answer_phase_N, final.answer_start_N, final.lengths_N),
    closed_N=final.answer_phase_N & config.budget_forcing,
    forced_N=jnp.any(final.forced_mask_NxT, axis=-1),
    truncated_N=~final.stopped_N,
    num_steps=final.step,
  )


# ------------------------------------------------------------------------------------------------ generate


def _check_inputs(model_cfg: model_lib.ModelConfig, prompt_tokens_UxP: Array, prompt_mask_UxP: Array,
                  config: SamplingConfig, prompt_of_B: Array | None) -> None:
  if prompt_tokens_UxP.ndim != 2 or prompt_mask_UxP.shape != prompt_tokens_UxP.shape:
    raise ValueError(f"prompt tokens {prompt_tokens_UxP.shape} and mask {prompt_mask_UxP.shape} must be the same "
                     "rank-2 shape (prompts x length); build both with `pad_prompts`.")
  if any(t >= model_cfg.vocab_size for t in config.close_tag_ids + (config.pad_id,)):
    raise ValueError(f"close_tag_ids={config.close_tag_ids} or pad_id={config.pad_id} is outside the model's "
                     f"vocabulary of {model_cfg.vocab_size} ids; encode them with the model's tokenizer.")
  if prompt_of_B is not None and prompt_of_B.ndim != 1:
    raise ValueError(f"prompt_of_B must be rank 1 (one prompt row index per request), got shape {prompt_of_B.shape}.")


def generate_impl(graphdef: nnx.GraphDef, params: Any, prompt_tokens_UxP: Array, prompt_mask_UxP: Array,
                  key: Array, config: SamplingConfig, prompt_of_B: Array | None = None) -> Rollout:
  """Samples `config.num_samples` completions for each of B requests (spec §1.6-§1.7).

  `generate` is this function jitted (graphdef and config static); call `generate_impl` inside a jitted program of
  your own (the trainer's rollout, with its shardings).

  Args:
    graphdef, params: `nnx.split(model)` of a `Transformer`; params may be sharded over a mesh, and the prompt batch
      over its data axis.
    prompt_tokens_UxP: int ids of U prompts, padded anywhere (left or right) to a common length P (see
      `pad_prompts`).
    prompt_mask_UxP: True on real prompt tokens; every prompt needs at least one.
    key: PRNG key; the same key gives the same samples.
    config: static `SamplingConfig`.
    prompt_of_B: optional int indices in [0, U), one per request: request b continues prompt row prompt_of_B[b], so
      a prompt asked for several times is prefilled once (`Sampler` builds it from duplicate prompts). Default: the
      U prompt rows are the B requests.

  Returns:
    A `Rollout` with N = B*G rows (row b*G + g is sample g of request b) and a completion buffer of
    `config.completion_len` tokens. With `config.chunk_rows` the rows are sampled chunk after chunk
    (`_sample_in_chunks`), with the same samples.
  """
  model = nnx.merge(graphdef, params)
  if model.config.remat != "none":
    # Sampling never differentiates, so remat saves nothing here, and its `nnx.remat` refuses the module inside the
    # decode loop (a Variable from the outer trace): sample with the same weights, remat off.
    model.config = model.config.replace(remat="none")
  if config.unroll_layers:
    model = model_lib.unrolled(model)  # a scanned model decodes unrolled (SamplingConfig.unroll_layers)
  _check_inputs(model.config, prompt_tokens_UxP, prompt_mask_UxP, config, prompt_of_B)
  B = prompt_tokens_UxP.shape[0] if prompt_of_B is None else prompt_of_B.shape[0]
  G, T = config.num_samples, config.completion_len
  N = B * G
  # All the randomness up front, one uniform per row and step: no random-bit generation inside the loop, and row n's
  # draws do not depend on which chunk samples it.
  uniforms_TxN = jax.random.uniform(key, (T, N), jnp.float32)
  if config.chunk_rows is None or config.chunk_rows >= N:
    return _sample_rows(model, prompt_tokens_UxP, prompt_mask_UxP, uniforms_TxN, config, prompt_of_B)
  return _sample_in_chunks(model, prompt_tokens_UxP, prompt_mask_UxP, uniforms_TxN, config, prompt_of_B)


def _sample_rows(model: model_lib.Transformer, prompt_tokens_UxP: Array, prompt_mask_UxP: Array, uniforms_TxN: Array,
                config: SamplingConfig, prompt_of_B: Array | None = None) -> Rollout:
  """Prefill, expand, decode and assemble all N rows at once; `uniforms_TxN` drives the draws (`select_tokens`)."""
  U, P = prompt_tokens_UxP.shape
  G, T = config.num_samples, config.completion_len
  N = uniforms_TxN.shape[1]
  cache_dtype = jnp.dtype(config.cache_dtype or model.config.dtype)

  cache, last_logits_UxV, prompt_tokens_UxP, prompt_mask_UxP = prefill(model, prompt_tokens_UxP, prompt_mask_UxP,
                                                                       P + T, cache_dtype)

  expand = functools.partial(expand_to_samples, num_samples=G, prompt_of_B=prompt_of_B)
  cache = expand_cache(cache, G, prompt_of_B, model.config.sharding_rules)
  prompt_tokens_NxP = expand(prompt_tokens_UxP)
  prompt_mask_NxP = expand(prompt_mask_UxP)
  inputs = _DecodeInputs(
    # The fed token always attends to itself, so an empty prompt cannot give an all-masked softmax row.
    prompt_keys_NxP=prompt_mask_NxP.at[:, -1].set(True),
    prompt_len_N=expand(jnp.sum(prompt_mask_UxP, axis=-1, dtype=jnp.int32)),
    uniforms_TxN=uniforms_TxN,
  )

  state = next_token(_initial_state(cache, N, T, config), expand(last_logits_UxV), cache, inputs.uniforms_TxN,
                     config)
  final = jax.lax.while_loop(lambda s: (s.step < T) & ~jnp.all(s.done_N),
                             lambda s: decode_step(model, s, inputs, config), state)
  return assemble(final, prompt_tokens_NxP, prompt_mask_NxP, config)


def _sample_in_chunks(model: model_lib.Transformer, prompt_tokens_UxP: Array, prompt_mask_UxP: Array,
                      uniforms_TxN: Array, config: SamplingConfig, prompt_of_B: Array | None) -> Rollout:
  """`_sample_rows` over Z = N / chunk_rows chunks of W = chunk_rows / G requests, one after another (`lax.map`).

  Request b = w*Z + z goes to chunk z (a stride, not a block): the data axis shards requests in contiguous blocks, so
  every chunk takes the same share of every device's requests and all devices work on every chunk (per device, the
  cache holds chunk_rows / devices rows when the devices divide W). Each chunk prefills its own requests' prompts,
  so a prompt shared by requests (`prompt_of_B`) is prefilled once per request here. Row n keeps its uniforms, and
  rows never interact, so the samples are the unchunked ones (to float rounding of batch-size-dependent kernels).
  """
  G, T = config.num_samples, config.completion_len
  N = uniforms_TxN.shape[1]
  B = N // G
  if N % config.chunk_rows:
    raise ValueError(f"SamplingConfig.chunk_rows={config.chunk_rows} does not divide the N = B*G = {B}*{G} = {N} "
                     "rows; use a chunk_rows that divides N (a divisor of B times G), or None for all rows at once.")
  W = config.chunk_rows // G
  Z = B // W
  if prompt_of_B is not None:
    prompt_tokens_UxP = jnp.take(prompt_tokens_UxP, prompt_of_B.astype(jnp.int32), axis=0)
    prompt_mask_UxP = jnp.take(prompt_mask_UxP, prompt_of_B.astype(jnp.int32), axis=0)
  rules = model.config.sharding_rules

  def split_requests(x_Bx):  # request b = w*Z + z -> [z, w]
    x_ZxWx = jnp.swapaxes(x_Bx.reshape((W, Z) + x_Bx.shape[1:]), 0, 1)
    return model_lib.constrain(x_ZxWx, (None, "batch") + (None,) * (x_Bx.ndim - 1), rules)

  uniforms_ZxTxWxG = jnp.transpose(uniforms_TxN.reshape(T, W, Z, G), (2, 0, 1, 3))
  uniforms_ZxTxN = model_lib.constrain(uniforms_ZxTxWxG.reshape(Z, T, W * G), (None, None, "batch"), rules)
  xs = (split_requests(prompt_tokens_UxP), split_requests(prompt_mask_UxP), uniforms_ZxTxN)

  def chunk(x):
    tokens_WxP, mask_WxP, chunk_uniforms_TxN = x
    return _sample_rows(model, tokens_WxP, mask_WxP, chunk_uniforms_TxN, config)

  stacked = jax.lax.map(chunk, xs)

  def merge_rows(x_ZxNx):  # [z, w*G + g] -> row (w*Z + z)*G + g
    if x_ZxNx.ndim == 1:  # num_steps: the longest chunk's, as one loop over all rows would have run
      return jnp.max(x_ZxNx)
    x_ZxWxGx = x_ZxNx.reshape((Z, W, G) + x_ZxNx.shape[2:])
    return jnp.swapaxes(x_ZxWxGx, 0, 1).reshape((N,) + x_ZxNx.shape[2:])

  return jax.tree.map(merge_rows, stacked)


generate = jax.jit(generate_impl, static_argnames=("graphdef", "config"))


@functools.lru_cache(maxsize=None)
def _generate_with(options: tuple[tuple[str, Any], ...]):
  return jax.jit(generate_impl, static_argnames=("graphdef", "config"), compiler_options=dict(options))


def generate_with_options(compiler_options: dict[str, Any] | None):
  """`generate`, jitted with XLA `compiler_options` (`jax.jit`'s; `Sampler` passes `tsallis_jax.xla_cpu`'s): one
  jitted function per distinct set of options, so each keeps its own compile cache; `generate` itself for none."""
  if not compiler_options:
    return generate
  return _generate_with(tuple(sorted(compiler_options.items())))
