"""Host side of the sampler: prompt padding and bucketing, shared-prefill bookkeeping, and the text-level `Sampler`."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from tsallis_jax import xla_cpu
from tsallis_jax.data.prompts import pad_rows
from tsallis_jax.sampler.config import Rollout, SamplingConfig
from tsallis_jax.sampler.stages import generate_with_options

Array = jax.Array

#: Prompt-length buckets used by `pad_prompts` (and `Sampler`) unless given: jit compiles one shape per bucket.
DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> int:
  """The smallest bucket >= length (so jit sees a handful of prompt shapes)."""
  for bucket in sorted(buckets):
    if bucket >= length:
      return int(bucket)
  raise ValueError(f"Prompt length {length} exceeds the largest bucket {max(buckets)}; pass larger "
                   "prompt_buckets or truncate the prompts.")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *, buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                side: str = "left") -> tuple[np.ndarray, np.ndarray]:
  """Pads ragged token-id lists to a bucketed length; returns `(tokens_BxP, mask_BxP)` as numpy arrays."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
  if not prompts:
    raise ValueError("pad_prompts got no prompts; pass at least one token-id list.")
  lengths = [len(p) for p in prompts]
  if min(lengths) == 0:
    raise ValueError(f"Prompt {lengths.index(0)} is empty; every prompt needs at least one token (add a BOS).")
  return pad_rows(prompts, bucket_length(max(lengths), buckets), pad_id, side=side)


def unique_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], np.ndarray]:
  """Distinct prompts (first-seen order) padded with repeats of the first to a power of two, and for each request
  the index of its prompt: `(rows, prompt_of_B)` for `generate`'s shared prefill."""
  index: dict[tuple[int, ...], int] = {}
  prompt_of_B = np.asarray([index.setdefault(tuple(int(t) for t in ids), len(index)) for ids in prompts], np.int32)
  rows = [list(ids) for ids in index]
  padded = 1 << max(len(rows) - 1, 0).bit_length()  # the next power of two: few compiled prefill shapes
  return rows + [rows[0]] * (padded - len(rows)), prompt_of_B


@dataclasses.dataclass(frozen=True)
class TextSamples:
  """Text-level output: `completions[b][g]` is sample g of prompt b, decoded without special tokens."""
  completions: list[list[str]]
  rollout: Rollout


class Sampler:
  """Text-level convenience: prompts as strings (optionally through the chat template), completions as strings.

  The model's graph is split once; `params` can be swapped per call (the trainer passes its current params). Calls
  go through one jitted `generate` (one per set of `compiler_options`), which compiles once per prompt bucket. With
  `share_prefill` (default) a prompt that occurs several times in one call is prefilled once and its KV cache shared
  by all its requests; the distinct prompts are padded up to a power of two (a handful of compiled shapes). The
  samples are the same as without sharing (same key, same rows).

  `cpu_emitters` (a `tsallis_jax.xla_cpu.CPU_EMITTERS` value) chooses XLA:CPU's emitters for the sampling program:
  "xla" (default) keeps XLA's default; "auto" and "quick_compile" apply the trainer's rule for its rollout
  (`TrainConfig.cpu_emitters`): a model whose layers decode under the scan (`ModelConfig.scan_layers` without
  `SamplingConfig.unroll_layers`) compiles with the older emitters on CPU. Unrolled models and other backends always
  keep XLA's default (`compiler_options`). The default is "xla" by the rule written before its A/B
  (`experiments/benchmarks/sampler_ours.py --emitters-ab`, 3 rounds): on a scanned `smollm2` "auto" shortened the
  first call (compile included) by 1-5% only, and one warm call ran 5.4% slower (the bound was 5%); on `tiny` it
  shortened the first call by 24-28% with the warm calls within 4%.
  """

  def __init__(self, model: nnx.Module, tokenizer: Any, config: SamplingConfig, *,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, chat_template: bool = False,
               padding_side: str = "left", share_prefill: bool = True, cpu_emitters: str = "xla"):
    if cpu_emitters not in xla_cpu.CPU_EMITTERS:
      raise ValueError(f"Sampler: cpu_emitters={cpu_emitters!r} is not one of {xla_cpu.CPU_EMITTERS}.")
    self.cpu_emitters = cpu_emitters
    model_config = getattr(model, "config", None)
    self.scan_layers = bool(getattr(model_config, "scan_layers", False))
    self.share_prefill = share_prefill
    self.graphdef, self.params = nnx.split(model)
    self.tokenizer = tokenizer
    self.config = config
    self.prompt_buckets = tuple(prompt_buckets)
    self.chat_template = chat_template
    self.padding_side = padding_side

  def encode(self, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, through the chat template (user turn + generation prompt) when enabled."""
    if isinstance(prompts, str):
      raise ValueError("Sampler expects a list of prompt strings, got a single string; wrap it in a list.")
    if self.chat_template:
      if getattr(self.tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template; set chat_template=False or "
                         "load a tokenizer that ships one.")
      texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False) for p in prompts]
      return self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
    return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

  def sample_ids(self, prompt_ids: Sequence[Sequence[int]], key: Array, params: Any = None) -> Rollout:
    """Samples G completions per request; a prompt repeated in the batch is prefilled once (`share_prefill`)."""
    params = self.params if params is None else params
    rows, prompt_of_B = unique_prompts(prompt_ids) if self.share_prefill else (list(prompt_ids), None)
    if prompt_of_B is not None and len(rows) >= len(prompt_ids):
      rows, prompt_of_B = list(prompt_ids), None  # too few repeats to save prefill rows: the plain path
    tokens_UxP, mask_UxP = pad_prompts(rows, self.config.pad_id, buckets=self.prompt_buckets,
                                       side=self.padding_side)
    generate = generate_with_options(self.compiler_options(params))
    return generate(self.graphdef, params, tokens_UxP, mask_UxP, key, self.config, prompt_of_B)

  def compiler_options(self, params: Any = None) -> dict[str, Any] | None:
    """The XLA options the sampling program compiles with for `params` (on their devices' platform; see the class
    docstring): `xla_cpu.OLDER_EMITTERS` or None (XLA's default)."""
    params = self.params if params is None else params
    array = next((x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
    platform = next(iter(array.devices())).platform if array is not None else jax.default_backend()
    return xla_cpu.program_options(self.cpu_emitters, scan_layers=self.scan_layers,
                                   unroll_decode=self.config.unroll_layers, platform=platform)["rollout"]

  def decode(self, rollout: Rollout) -> list[list[str]]:
    """Completion strings per prompt, each cut at its length, special tokens skipped."""
    tokens_NxT = np.asarray(rollout.tokens_NxT)
    lengths_N = np.asarray(rollout.lengths_N)
    texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(tokens_NxT, lengths_N)],
                                        skip_special_tokens=True)
    G = self.config.num_samples
    return [texts[b * G:(b + 1) * G] for b in range(len(texts) // G)]

  def __call__(self, prompts: Sequence[str], key: Array, params: Any = None) -> TextSamples:
    rollout = self.sample_ids(self.encode(prompts), key, params)
    return TextSamples(completions=self.decode(rollout), rollout=rollout)
