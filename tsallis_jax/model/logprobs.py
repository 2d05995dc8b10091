"""Per-token and per-segment log-probabilities for the estimators (spec §1.6: GARL's w = p(y*|x, z), PAFT's
teacher-forced log p(z, y*|x)).

One forward pass over [prompt, rationale, answer] gives both log p(z|x) (the rationale segment) and
log p(y*|x, z) (the answer segment after it): each is a masked sum of the same per-token log-probs.

The segment masks must not include a row's first real token (it has no prefix to be scored against).

Alignment: `logp_NxT[:, t] = log p(tokens[:, t] | tokens[:, <t])`, with `logp_NxT[:, 0] = 0` (the first token has
no prefix inside the sequence). A segment mask therefore marks the tokens *being scored*.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from tsallis_jax.model.cache import make_attention_mask, make_positions


def aligned_token_logprobs(logits_NxTxV: jax.Array, targets_NxT: jax.Array) -> jax.Array:
  """log softmax(logits)[target] at every position, for logits already aligned with the tokens they score (the
  logits at t predict targets[t]): the gathered logit minus the logsumexp, without the full log-softmax."""
  picked_NxT = jnp.take_along_axis(logits_NxTxV, targets_NxT[:, :, None].astype(jnp.int32), axis=-1)[:, :, 0]
  return picked_NxT - jax.nn.logsumexp(logits_NxTxV, axis=-1)


def token_logprobs(logits_NxTxV: jax.Array, tokens_NxT: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature) of each next token, in float32, shifted so position t scores tokens[t].

  Computed as gathered logit - logsumexp, without materialising the full log-softmax.
  """
  if logits_NxTxV.ndim != 3 or tokens_NxT.shape != logits_NxTxV.shape[:2]:
    raise ValueError(f"token_logprobs needs logits of rank 3 matching tokens; got {logits_NxTxV.shape} and "
                     f"{tokens_NxT.shape}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  logits_NxTxV = logits_NxTxV.astype(jnp.float32)
  if temperature != 1.0:
    logits_NxTxV = logits_NxTxV / temperature
  logp_NxTm = aligned_token_logprobs(logits_NxTxV[:, :-1], tokens_NxT[:, 1:])
  return jnp.pad(logp_NxTm, ((0, 0), (1, 0)))


def token_logprobs_from_hidden(model, hidden_NxTxD: jax.Array, tokens_NxT: jax.Array, *, temperature: float = 1.0,
                               chunk_size: int = 256) -> jax.Array:
  """`token_logprobs(model.logits(hidden), tokens)` without materialising the NxTxV logits.

  The time axis is cut into chunks of `chunk_size`; each chunk's float32 logits are built, reduced to the gathered
  logit minus the logsumexp, and rematerialised in the backward pass (`jax.checkpoint`), so peak memory holds one
  NxCxV chunk instead of NxTxV (Qwen3's V is 151,936).
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  n, t = tokens_NxT.shape
  if hidden_NxTxD.shape[:2] != (n, t):
    raise ValueError(f"hidden states {hidden_NxTxD.shape} do not match tokens {tokens_NxT.shape}.")
  w_VxD = model.head_weight().astype(hidden_NxTxD.dtype)
  prev_NxTmxD, next_NxTm = hidden_NxTxD[:, :-1], tokens_NxT[:, 1:].astype(jnp.int32)
  chunks = -(-(t - 1) // chunk_size)
  pad = chunks * chunk_size - (t - 1)
  prev_NxPxD = jnp.pad(prev_NxTmxD, ((0, 0), (0, pad), (0, 0)))
  next_NxP = jnp.pad(next_NxTm, ((0, 0), (0, pad)))
  prev_CxNxUxD = prev_NxPxD.reshape(n, chunks, chunk_size, -1).transpose(1, 0, 2, 3)
  next_CxNxU = next_NxP.reshape(n, chunks, chunk_size).transpose(1, 0, 2)

  @jax.checkpoint
  def chunk_logp(w_VxD, h_NxUxD, y_NxU):
    logits_NxUxV = jnp.einsum("nud,vd->nuv", h_NxUxD, w_VxD, preferred_element_type=jnp.float32) / temperature
    return aligned_token_logprobs(logits_NxUxV, y_NxU)

  logp_CxNxU = jax.lax.map(lambda xs: chunk_logp(w_VxD, *xs), (prev_CxNxUxD, next_CxNxU))
  logp_NxTm = logp_CxNxU.transpose(1, 0, 2).reshape(n, chunks * chunk_size)[:, : t - 1]
  return jnp.pad(logp_NxTm, ((0, 0), (1, 0)))


def segment_logprob(logp_NxT: jax.Array, mask_NxT: jax.Array) -> jax.Array:
  """Sum of the per-token log-probs over a segment: log p(segment | everything before it), one value per row."""
  if logp_NxT.shape != mask_NxT.shape:
    raise ValueError(f"segment_logprob: logp shape {logp_NxT.shape} differs from mask shape {mask_NxT.shape}.")
  return jnp.sum(jnp.where(mask_NxT.astype(bool), logp_NxT.astype(jnp.float32), 0.0), axis=-1)


def sequence_logprobs(model, tokens_NxT: jax.Array, pad_mask_NxT: jax.Array, segments: Mapping[str, jax.Array], *,
                      temperature: float = 1.0, chunk_size: int | None = None
                      ) -> tuple[dict[str, jax.Array], jax.Array]:
  """One forward pass, then the summed log-prob of each named segment (e.g. {"rationale": ..., "answer": ...}).

  Args:
    model: a `Transformer` (merge it from params inside the jitted function that calls this).
    tokens_NxT: left- or right-padded [prompt, rationale, answer] sequences.
    pad_mask_NxT: True on real tokens.
    segments: name -> bool mask of the tokens each segment scores; must lie inside `pad_mask_NxT`.
    temperature: the sampler's temperature, so trainer and sampler log-probs agree.
    chunk_size: if set, score through `token_logprobs_from_hidden` in chunks of this many positions (no full
      logits); None computes the full logits once.

  Returns:
    ({name: logp_N}, logp_NxT): the per-segment sums and the per-token log-probs (zero off the pad mask).
  """
  positions_NxT = make_positions(pad_mask_NxT)
  attn_mask_NxTxT = make_attention_mask(pad_mask_NxT)
  if chunk_size is None:
    logits_NxTxV, _ = model(tokens_NxT, positions_NxT, attn_mask_NxTxT)
    logp_NxT = token_logprobs(logits_NxTxV, tokens_NxT, temperature=temperature)
  else:
    hidden_NxTxD, _ = model.hidden(tokens_NxT, positions_NxT, attn_mask_NxTxT)
    logp_NxT = token_logprobs_from_hidden(model, hidden_NxTxD, tokens_NxT, temperature=temperature,
                                          chunk_size=chunk_size)
  logp_NxT = jnp.where(pad_mask_NxT.astype(bool), logp_NxT, 0.0)
  return {name: segment_logprob(logp_NxT, mask_NxT) for name, mask_NxT in segments.items()}, logp_NxT
