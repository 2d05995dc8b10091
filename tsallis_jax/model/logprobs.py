"""Per-token and per-segment log-probabilities for the estimators (spec §1.6: GARL's w = p(y*|x, z), PAFT's
teacher-forced log p(z, y*|x)).

One forward pass over [prompt, rationale, answer] gives both log p(z|x) (the rationale segment) and
log p(y*|x, z) (the answer segment after it): each is a masked sum of the same per-token log-probs.

Alignment: `logp_NxT[:, t] = log p(tokens[:, t] | tokens[:, <t])`, with `logp_NxT[:, 0] = 0` (the first token has
no prefix inside the sequence). A segment mask therefore marks the tokens *being scored*.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from tsallis_jax.model.cache import make_attention_mask, make_positions


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
  prev_logits_NxTmxV = logits_NxTxV[:, :-1]
  next_tokens_NxTm = tokens_NxT[:, 1:].astype(jnp.int32)
  picked_NxTm = jnp.take_along_axis(prev_logits_NxTmxV, next_tokens_NxTm[:, :, None], axis=-1)[:, :, 0]
  logp_NxTm = picked_NxTm - jax.nn.logsumexp(prev_logits_NxTmxV, axis=-1)
  return jnp.pad(logp_NxTm, ((0, 0), (1, 0)))


def segment_logprob(logp_NxT: jax.Array, mask_NxT: jax.Array) -> jax.Array:
  """Sum of the per-token log-probs over a segment: log p(segment | everything before it), one value per row."""
  if logp_NxT.shape != mask_NxT.shape:
    raise ValueError(f"segment_logprob: logp shape {logp_NxT.shape} differs from mask shape {mask_NxT.shape}.")
  return jnp.sum(jnp.where(mask_NxT.astype(bool), logp_NxT.astype(jnp.float32), 0.0), axis=-1)


def sequence_logprobs(model, tokens_NxT: jax.Array, pad_mask_NxT: jax.Array, segments: Mapping[str, jax.Array], *,
                      temperature: float = 1.0) -> tuple[dict[str, jax.Array], jax.Array]:
  """One forward pass, then the summed log-prob of each named segment (e.g. {"rationale": ..., "answer": ...}).

  Args:
    model: a `Transformer` (merge it from params inside the jitted function that calls this).
    tokens_NxT: left- or right-padded [prompt, rationale, answer] sequences.
    pad_mask_NxT: True on real tokens.
    segments: name -> bool mask of the tokens each segment scores; must lie inside `pad_mask_NxT`.
    temperature: the sampler's temperature, so trainer and sampler log-probs agree.

  Returns:
    ({name: logp_N}, logp_NxT): the per-segment sums and the per-token log-probs (zero off the pad mask).
  """
  positions_NxT = make_positions(pad_mask_NxT)
  logits_NxTxV, _ = model(tokens_NxT, positions_NxT, make_attention_mask(pad_mask_NxT))
  logp_NxT = token_logprobs(logits_NxTxV, tokens_NxT, temperature=temperature)
  logp_NxT = jnp.where(pad_mask_NxT.astype(bool), logp_NxT, 0.0)
  return {name: segment_logprob(logp_NxT, mask_NxT) for name, mask_NxT in segments.items()}, logp_NxT
