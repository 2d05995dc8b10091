"""The sampler's two types: its static settings (`SamplingConfig`) and what it returns (`Rollout`)."""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: one compiled `generate` per config and prompt bucket).

  Attributes:
    num_samples: G, samples drawn per prompt (the paper's M = 32 in training, 16 in evaluation, spec §1.7).
    max_new_tokens: completion length T when budget forcing is off.
    temperature: T > 0 samples from softmax(logits / T); 0 decodes greedily.
    top_k: keep only the k most likely tokens (0 disables).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 disables); applied after
      top-k, on the renormalised top-k distribution (the `transformers` order).
    stop_ids: token ids that end a sequence (EOS and any stop tokens); the stop token itself is kept in the
      completion and counts towards its length.
    pad_id: written after a sequence has ended.
    close_tag_ids: token ids of the closing tag (e.g. `</think>`); non-empty enables budget forcing (spec §1.7).
    rationale_budget: rationale tokens a row may sample before the closing tag is forced.
    answer_budget: tokens a row may sample after its closing tag.
    cache_dtype: KV-cache dtype name ("float32", "bfloat16", "float16"); None uses the model's compute dtype. A
      bfloat16 cache halves the rollout's largest buffer; keys and values are rounded when written, attention still
      runs in the compute dtype.
    chunk_rows: None samples all N = B*G rows at once; an int samples them in sequential chunks of that many rows
      (whole prompts: a multiple of `num_samples`, dividing N) inside the one jitted program, so the KV cache holds
      chunk_rows rows instead of N. The samples equal the unchunked ones for the same key.
    unroll_layers: a model with its layers under scan (`ModelConfig.scan_layers`) decodes with them unrolled: its
      stacked weights are sliced into per-layer blocks once per call, before the decode loop
      (`model.transformer.unrolled`). The same samples. Off by default: on CPU it does not pay (`smollm2`,
      `experiments/benchmarks/decode_layers.py`: rollout 0.89 s against 1.05 s in the trainer's step, but the
      rollout compiles in 5.9 s against 1.3 s, and the first step takes 18.4 s against 10.7 s). It is for
      accelerators, where the scanned decode was the whole of the scanned step's extra time (H200, Qwen3-0.6B, 64
      rows x 529 tokens: rollout 3.30 s scanned, 1.90 s with an unrolled model). No effect on an unrolled model.
  """
  num_samples: int = 1
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  close_tag_ids: tuple[int, ...] = ()
  rationale_budget: int = 0
  answer_budget: int = 0
  cache_dtype: str | None = None
  chunk_rows: int | None = None
  unroll_layers: bool = False

  def __post_init__(self):
    for name in ("num_samples", "max_new_tokens"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"SamplingConfig.{name} must be a positive int, got {value!r}.")
    if not self.temperature >= 0.0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 disables it), got {self.top_k!r}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 disables it), got {self.top_p!r}.")
    for name in ("stop_ids", "close_tag_ids"):
      value = getattr(self, name)
      if not isinstance(value, tuple) or not all(isinstance(t, (int, np.integer)) and t >= 0 for t in value):
        raise ValueError(f"SamplingConfig.{name} must be a tuple of non-negative ints, got {value!r}; "
                         "pass e.g. (tokenizer.eos_token_id,).")
    if self.close_tag_ids:
      if self.rationale_budget <= 0 or self.answer_budget <= 0:
        raise ValueError(
          "Budget forcing is on (close_tag_ids is set) but rationale_budget="
          f"{self.rationale_budget} and answer_budget={self.answer_budget}; set both to positive token counts "
          "(the paper uses e.g. rationale 4096-128 and answer 128 on FinQA), or leave close_tag_ids empty.")
    elif self.rationale_budget or self.answer_budget:
      raise ValueError("rationale_budget/answer_budget are set but close_tag_ids is empty; pass the closing tag's "
                       "token ids (e.g. tokenizer.encode('</think>')) to enable budget forcing.")
    if self.cache_dtype is not None and self.cache_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"SamplingConfig.cache_dtype={self.cache_dtype!r}; use 'float32', 'bfloat16', 'float16' "
                       "or None (the model's compute dtype).")

    if self.chunk_rows is not None:
      if not isinstance(self.chunk_rows, (int, np.integer)) or self.chunk_rows <= 0:
        raise ValueError(f"SamplingConfig.chunk_rows={self.chunk_rows!r} must be a positive int or None (all rows "
                         "at once).")
      if self.chunk_rows % self.num_samples:
        raise ValueError(f"SamplingConfig.chunk_rows={self.chunk_rows} is not a multiple of num_samples="
                         f"{self.num_samples}: a chunk holds whole prompts with all their samples (prefill once, "
                         f"repeat G times); use a multiple of {self.num_samples}, e.g. "
                         f"{max(1, self.chunk_rows // self.num_samples) * self.num_samples}.")

  @property
  def budget_forcing(self) -> bool:
    return bool(self.close_tag_ids)

  @property
  def completion_len(self) -> int:
    """T, the completion buffer length: rationale + closing tag + answer budgets, or `max_new_tokens`."""
    if self.budget_forcing:
      return self.rationale_budget + len(self.close_tag_ids) + self.answer_budget
    return self.max_new_tokens

  @property
  def filtered(self) -> bool:
    return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)


@flax.struct.dataclass
class Rollout:
  """Sampled completions for N = B*G rows; row `b*G + g` is sample g of prompt (request) b.

  Attributes:
    prompt_tokens_NxP: the prompts, left-aligned (pads first), repeated G times.
    prompt_mask_NxP: True on real prompt tokens (the prompt segment).
    tokens_NxT: completion tokens, `pad_id` after the end.
    logp_NxT: log-prob of each token under the sampling distribution (tempered, filtered); 0 on forced tokens, under
      greedy decoding and after the end.
    model_logp_NxT: log softmax(logits / T) of each token, unfiltered (T = 1 under greedy); the value a teacher-forced
      forward pass at the sampling temperature reproduces; 0 after the end.
    mask_NxT: True on completion tokens (stop token and forced tokens included).
    forced_mask_NxT: True on tokens that budget forcing fed in instead of sampling.
    rationale_mask_NxT: True on the rationale segment, closing tag included (all False without budget forcing).
    answer_mask_NxT: True on the answer segment (the whole completion without budget forcing).
    lengths_N: number of completion tokens.
    answer_start_N: index of the first answer token (the rationale length with its closing tag; 0 without budget
      forcing; `lengths_N` for a row that stopped inside its rationale, which has no answer). Teacher-force a gold
      answer after `tokens_NxT[:, :answer_start_N]` for the paper's weight w = p(y*|x, z) (spec §1.6, eq. 7).
    closed_N: the closing tag is present (sampled or forced).
    forced_N: the closing tag was forced.
    truncated_N: the row ran out of budget instead of emitting a stop token.
    num_steps: completion positions generated (token 0 from the prefill's logits, then one decode step each;
      fewer than T when every row stopped early).
  """
  prompt_tokens_NxP: Array
  prompt_mask_NxP: Array
  tokens_NxT: Array
  logp_NxT: Array
  model_logp_NxT: Array
  mask_NxT: Array
  forced_mask_NxT: Array
  rationale_mask_NxT: Array
  answer_mask_NxT: Array
  lengths_N: Array
  answer_start_N: Array
  closed_N: Array
  forced_N: Array
  truncated_N: Array
  num_steps: Array
