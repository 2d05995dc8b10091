"""KV-cached rollout sampler: one prefill per prompt, one jitted `lax.while_loop` decode (spec §1.6, §1.7).

The trainer draws M rationales per prompt from the current policy (spec §1.6, "draw M i.i.d. rationales from the
prior") and evaluation draws 16 per prompt (spec §1.7). This module does both:

* **Prefill once, decode G times.** The prompts are prefilled once into a KV cache with one row per prompt; the cache
  rows are then repeated G times (N = B*G rows, row `b*G + g` is sample g of prompt b), so the prompt is never
  recomputed per sample. The same holds across requests: `Sampler` prefills a prompt that appears several times in
  one batch once (U distinct prompt rows; `prompt_of_B` maps each of the B requests to its row), as vLLM's prefix
  cache does for exact repeats.
* **One jitted loop.** Decoding is a single `lax.while_loop` over fixed-size buffers (tokens, log-probs, masks, KV
  cache) that stops as soon as every row is done. Nothing in it syncs with the host or runs Python per token.
* **Any padding, bucketed lengths.** Prompts may be left- or right-padded (any pad mask); they are left-aligned on
  device, so every row's last prompt token sits in the same cache slot. `pad_prompts` pads a ragged batch up to a
  bucket length so jit compiles a handful of prompt shapes.
* **Budget forcing** (spec §1.7, s1-style): with `close_tag_ids` set, a row that has not closed its rationale after
  `rationale_budget` tokens is force-fed the closing tag (`</think>`, possibly several tokens) and then gets its own
  `answer_budget`. A row whose model emits the tag by itself switches to the answer phase there.

Log-probs. Two per token are returned:

* `logp_NxT`: log-prob under the distribution the token was actually drawn from, i.e. softmax(logits / T) after the
  top-k / top-p filter, renormalised over the kept tokens. Greedy decoding (T = 0) is a point mass, so it is 0; forced
  tokens are 0 too (they were not drawn).
* `model_logp_NxT`: log softmax(logits / T) of the token with no filter (T = 1 under greedy), also for forced tokens.
  This is what a teacher-forced forward pass at the same temperature gives, so `mismatch/logp_abs_diff` compares the
  trainer's recomputed log-probs to this array.

Without filtering and with T > 0 the two are equal except on forced tokens.

Modules: `config` (`SamplingConfig`, `Rollout`), `select` (token selection), `stages` (`generate`: prefill, expand to
samples, decode, assemble), `host` (`pad_prompts`, `unique_prompts`, the text-level `Sampler`).
"""
from tsallis_jax.sampler.config import Rollout, SamplingConfig
from tsallis_jax.sampler.select import FLAT_CDF_MAX, inverse_cdf_sample, sample_from_logits, select_tokens
from tsallis_jax.sampler.stages import generate, generate_impl, generate_with_options
from tsallis_jax.sampler.host import (DEFAULT_PROMPT_BUCKETS, Sampler, TextSamples, bucket_length, pad_prompts,
                                      unique_prompts)

__all__ = [
  "DEFAULT_PROMPT_BUCKETS", "FLAT_CDF_MAX", "Rollout", "Sampler", "SamplingConfig", "TextSamples", "bucket_length",
  "generate", "generate_impl", "generate_with_options", "inverse_cdf_sample", "pad_prompts", "sample_from_logits",
  "select_tokens", "unique_prompts",
]
