"""Hidden states of G continuations of each prompt, with each prompt's forward pass run once (prompt sharing).

A GRPO / GARL / PAFT batch scores G sampled completions of each of B prompts: rows n = b*G + g of the N = B*G
sequences [prompt b, completion n] share their first P tokens. Under causal attention the prompt positions' hidden
states, keys and values do not depend on what follows them, so one forward pass over the N full sequences computes
every prompt G times. `completion_hidden` runs the B prompts once, keeping every layer's prompt keys and values,
and runs the N completions attending over [their prompt, themselves] (`Transformer.hidden(..., prefix=...)`: read-only
keys and values, repeated G times one layer at a time, nothing written in place, so the backward pass holds neither a
per-layer copy of a carried cache under `scan_layers` nor the G-fold repeat of every layer's prompt keys at once).

It is the same function of the parameters as the full forward pass. Under `jax.grad` the G copies' key/value
gradients sum back into the one prompt pass (the transpose of the repeat), so the gradient is the full pass's too.
Only the float32 summation order differs (`tests/test_shared_prompt.py` compares both). The layers' work falls from
N * (P + T) token positions to B * P + N * T: on the `smollm2` benchmark (B 2, G 4, P 32, T 17) from 392 to 200
positions per forward; in the paper's setting (G = 32 rationales per prompt, prompts with long contexts) nearly all
of the prompts' cost is saved.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tsallis_jax.model.cache import empty_prefix, make_attention_mask, make_positions


def completion_hidden(model, prompt_tokens_BxP: jax.Array, prompt_mask_BxP: jax.Array, comp_tokens_NxT: jax.Array,
                      comp_mask_NxT: jax.Array) -> jax.Array:
  """The final-normed hidden states of the N = B*G sequences [prompt b, completion n] (n = b*G + g) at positions
  P-1 .. P+T-1: entry t of the result predicts completion token t (the last entry predicts past the completion).

  Equals `model.hidden(tokens_NxS, ...)[0][:, P-1:]` over the concatenated sequences with `make_positions` /
  `make_attention_mask` of their pad mask, with each prompt's P positions computed once instead of G times.

  Args:
    model: a `Transformer`.
    prompt_tokens_BxP, prompt_mask_BxP: the B distinct prompts and their pad masks (True on real tokens), padded
      anywhere to a common length P.
    comp_tokens_NxT, comp_mask_NxT: the N = B*G completions; row b*G + g continues prompt b.

  Returns:
    NxT+1xD hidden states in the model's compute dtype.
  """
  b, p = prompt_tokens_BxP.shape
  n, t = comp_tokens_NxT.shape
  if comp_mask_NxT.shape != (n, t) or prompt_mask_BxP.shape != (b, p):
    raise ValueError(f"completion_hidden: tokens and masks differ in shape (prompts {prompt_tokens_BxP.shape} / "
                     f"{prompt_mask_BxP.shape}, completions {comp_tokens_NxT.shape} / {comp_mask_NxT.shape}).")
  if n % b:
    raise ValueError(f"completion_hidden: {n} completion rows are not a whole number of samples for each of {b} "
                     "prompts; rows b*G + g must continue prompt b.")
  g = n // b
  cfg = model.config
  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  # The prompt pass: causal over its own P positions; it returns every layer's prompt keys and values.
  prompt_hidden_BxPxD, prompt_kv = model.hidden(prompt_tokens_BxP, make_positions(prompt_mask_BxP),
                                                make_attention_mask(prompt_mask_BxP),
                                                prefix=empty_prefix(cfg, b, cfg.compute_dtype))
  # The completion pass: the positions and mask rows of the full sequences' completion part; row b*G + g attends
  # over [prompt b's keys and values, itself] (the model repeats the B prompt rows one layer at a time).
  pad_NxS = jnp.concatenate([jnp.repeat(prompt_mask_BxP, g, axis=0), comp_mask_NxT.astype(bool)], axis=1)
  positions_NxT = make_positions(pad_NxS)[:, p:]
  attn_NxTxS = make_attention_mask(pad_NxS)[:, p:]
  comp_hidden_NxTxD, _ = model.hidden(comp_tokens_NxT, positions_NxT, attn_NxTxS, prefix=prompt_kv)
  last_prompt_Nx1xD = jnp.repeat(prompt_hidden_BxPxD[:, p - 1:], g, axis=0)
  return jnp.concatenate([last_prompt_Nx1xD, comp_hidden_NxTxD], axis=1)
