"""Hidden states of G continuations of each prompt, with each prompt's forward pass run once (prompt sharing).

A GRPO / GARL / PAFT batch scores G sampled completions of each of B prompts: rows n = b*G + g of the N = B*G
sequences [prompt b, completion n] share their first P tokens. Under causal attention the prompt positions' hidden
states, keys and values do not depend on what follows them, so one forward pass over the N full sequences computes
every prompt G times. `completion_hidden` packs each group into one row [prompt b, completion b*G, ..., completion
b*G + G-1] of L = P + G*T tokens and runs the B packed rows through the model once, with a `PromptGroupMask`: every
projection and MLP is one product over the B*L = B*P + N*T tokens, and attention runs per part, the prompt over
itself and each completion over [its prompt, itself] (`transformer.attend_prompt_groups`, which repeats the prompt's
keys and values G times one layer at a time).

It is the same function of the parameters as the full forward pass. Under `jax.grad` the G copies' key/value
gradients sum back into the one prompt (the transpose of the repeat), so the gradient is the full pass's too.
Only the float32 summation order differs (`tests/test_shared_prompt.py` compares both). The layers' work falls from
N * (P + T) token positions to B * P + N * T: on the `smollm2` benchmark (B 2, G 4, P 32, T 17) from 392 to 200
positions per forward; in the paper's setting (G = 32 rationales per prompt, prompts with long contexts) nearly all
of the prompts' cost is saved. One packed pass instead of a prompt pass and a completion pass (the first design)
keeps the products as tall as possible (200 rows instead of 64 and 136) and the compiled program one pass long.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tsallis_jax.model.cache import PromptGroupMask, make_attention_mask, make_positions


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
  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  # Positions and mask rows of the full sequences [prompt b, completion n]; the prompt's are the same for its G rows.
  pad_NxS = jnp.concatenate([jnp.repeat(prompt_mask_BxP, g, axis=0), comp_mask_NxT.astype(bool)], axis=1)
  packed = lambda x_NxT: x_NxT.reshape(b, g * t)  # noqa: E731  rows b*G .. b*G + G-1 side by side
  tokens_BxL = jnp.concatenate([prompt_tokens_BxP, packed(comp_tokens_NxT).astype(prompt_tokens_BxP.dtype)], axis=1)
  positions_BxL = jnp.concatenate([make_positions(prompt_mask_BxP), packed(make_positions(pad_NxS)[:, p:])], axis=1)
  mask = PromptGroupMask(prompt_BxPxP=make_attention_mask(prompt_mask_BxP),
                         comp_NxTxS=make_attention_mask(pad_NxS)[:, p:])
  hidden_BxLxD, _ = model.hidden(tokens_BxL, positions_BxL, mask)
  d = hidden_BxLxD.shape[-1]
  last_prompt_Nx1xD = jnp.repeat(hidden_BxLxD[:, p - 1:p], g, axis=0)
  return jnp.concatenate([last_prompt_Nx1xD, hidden_BxLxD[:, p:].reshape(n, t, d)], axis=1)
