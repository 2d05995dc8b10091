"""The grain pipeline that feeds prompts to the trainer (issue 6).

`make_prompt_loader(records, tokenizer, ...)` returns a `PromptLoader`: a `grain.MapDataset` of global index batches,

  range(n) -> shuffle(seed) -> repeat(num_epochs) -> batch(batch_size, drop_remainder=True) -> host slice -> tokens,

so the order depends only on `seed` (every epoch is reshuffled: grain folds the epoch into the seed; a batch may
straddle two epochs, since batching comes after repetition, and the only records left out are those of a last
partial batch when `num_epochs` is finite), every host computes the same global batches and keeps rows
`[shard_index * b, (shard_index + 1) * b)` with `b = batch_size // shard_count`, and a batch is a pure function of
its step number. Iterating gives a grain `DatasetIterator` whose `get_state()` / `set_state()` resume at the exact
batch (store the state in the checkpoint).

Each batch is a dict of numpy arrays (`b` rows):

* `prompt_tokens_BxP` int32, left-padded with the pad id to `P` = the longest prompt of the batch rounded up to a
  multiple of `pad_multiple` (capped at `max_prompt_tokens`): a few bucketed lengths, so few recompiles;
* `prompt_mask_BxP` bool, True on real tokens;
* `answer_tokens_BxA` int32, right-padded to `A = max_answer_tokens`: the teacher-forced gold answer, the tokens the
  model emits after `</think>`, ending with EOS (`prompts.gold_answer_ids`);
* `answer_mask_BxA` bool;
* `index_B` int32: the record's index in `records` (for evaluation and error messages).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import grain
import numpy as np

from tsallis_jax.data import prompts
from tsallis_jax.data.records import BudgetError, Record

log = logging.getLogger(__name__)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  batch_size: int
  seed: int
  style: prompts.Style
  max_prompt_tokens: int
  max_answer_tokens: int
  shard_index: int
  shard_count: int
  num_epochs: int | None
  pad_multiple: int
  prefetch_batches: int


class PromptLoader:
  """Seeded, sharded, resumable batches of prompts and gold answers (see the module docstring).

  `loader[step]` is the batch at `step`; `iter(loader)` is a grain iterator with `get_state()` / `set_state()`.
  """

  def __init__(self, records: Sequence[Record], tokenizer: Any, config: LoaderConfig):
    self.records = list(records)
    self.tokenizer = tokenizer
    self.config = config
    self.per_host_batch = config.batch_size // config.shard_count
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prompts.eos_id(tokenizer)
    self._cache: dict[int, tuple[list[int], list[int]]] = {}
    self.truncated_count = 0
    ds = grain.MapDataset.range(len(self.records)).shuffle(seed=config.seed).repeat(config.num_epochs)
    ds = ds.batch(config.batch_size, drop_remainder=True)
    self._dataset = ds.map(self._make_batch)

  @property
  def batches_per_epoch(self) -> int:
    return len(self.records) // self.config.batch_size

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    return self._dataset[step]

  def __iter__(self) -> grain.DatasetIterator:
    # One worker thread tokenises `prefetch_batches` ahead (grain's default would read 500 elements ahead on 16
    # threads); the iterator's state is still the next batch position.
    options = grain.ReadOptions(num_threads=1 if self.config.prefetch_batches else 0,
                                prefetch_buffer_size=self.config.prefetch_batches)
    return self._dataset.to_iter_dataset(options).__iter__()

  def tokens(self, index: int) -> tuple[list[int], list[int]]:
    """(prompt ids, gold answer ids) of record `index`, computed once."""
    if index not in self._cache:
      record = self.records[index]
      c = self.config
      p_ids, dropped = prompts.prompt_ids(record, self.tokenizer, style=c.style, max_prompt_tokens=c.max_prompt_tokens)
      if dropped:
        self.truncated_count += 1
        log.debug("%s: %d context units dropped to fit %d prompt tokens", record.where(), dropped,
                  c.max_prompt_tokens)
      a_ids = prompts.gold_answer_ids(record, self.tokenizer, style=c.style)
      if len(a_ids) > c.max_answer_tokens:
        raise BudgetError(f"{record.where()}: the gold answer has {len(a_ids)} tokens (EOS included), over "
                          f"max_answer_tokens={c.max_answer_tokens}; raise max_answer_tokens (the config key "
                          "max_answer_len).")
      self._cache[index] = (p_ids, a_ids)
    return self._cache[index]

  def _make_batch(self, global_index_B: np.ndarray) -> dict[str, np.ndarray]:
    c, b = self.config, self.per_host_batch
    index_B = np.asarray(global_index_B[c.shard_index * b:(c.shard_index + 1) * b], np.int32)
    pairs = [self.tokens(int(i)) for i in index_B]
    longest = max(len(p) for p, _ in pairs)
    length = min(_round_up(longest, c.pad_multiple), c.max_prompt_tokens)
    prompt_tokens_BxP, prompt_mask_BxP = prompts.pad_rows([p for p, _ in pairs], length, self.pad_id, side="left")
    answer_tokens_BxA, answer_mask_BxA = prompts.pad_rows([a for _, a in pairs], c.max_answer_tokens, self.pad_id,
                                                          side="right")
    return dict(prompt_tokens_BxP=prompt_tokens_BxP, prompt_mask_BxP=prompt_mask_BxP,
                answer_tokens_BxA=answer_tokens_BxA, answer_mask_BxA=answer_mask_BxA, index_B=index_B)


def make_prompt_loader(records: Sequence[Record], tokenizer: Any, *, batch_size: int, seed: int,
                       style: prompts.Style = "cold", max_prompt_tokens: int, max_answer_tokens: int = 32,
                       shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                       pad_multiple: int = 32, prefetch_batches: int = 2) -> PromptLoader:
  """A `PromptLoader` over `records` (see the module docstring).

  Args:
    records: the split to iterate.
    tokenizer: any HF tokenizer with an EOS and a single `</think>` token (chat template used if present).
    batch_size: the *global* batch size; each of the `shard_count` hosts gets `batch_size // shard_count` rows.
    seed: the shuffle seed.
    style: "cold" or "warm" (prompts.py).
    max_prompt_tokens: prompt budget; the context is truncated by context.py's rule.
    max_answer_tokens: A, the fixed width of the gold-answer arrays; a longer answer raises.
    shard_index, shard_count: this host's slice of the global batch.
    num_epochs: passes over the data; None repeats forever.
    pad_multiple: prompt lengths are rounded up to a multiple of it.
    prefetch_batches: batches a background thread prepares ahead of the iterator (0: none).
  """
  if style not in prompts.STYLES:
    raise ValueError(f"style={style!r}: use 'cold' or 'warm'.")
  if not records:
    raise ValueError("make_prompt_loader got no records; check the split and the data folder.")
  if batch_size < 1 or shard_count < 1 or batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of shard_count={shard_count} "
                     "(the global batch is split evenly across hosts).")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  if batch_size > len(records):
    raise ValueError(f"batch_size={batch_size} exceeds the {len(records)} records; lower it.")
  if max_prompt_tokens < 1 or max_answer_tokens < 1 or pad_multiple < 1 or prefetch_batches < 0:
    raise ValueError("max_prompt_tokens, max_answer_tokens and pad_multiple must be positive, prefetch_batches >= 0.")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1, or None for endless repetition.")
  prompts.close_tag_ids(tokenizer)
  config = LoaderConfig(batch_size=batch_size, seed=seed, style=style, max_prompt_tokens=max_prompt_tokens,
                        max_answer_tokens=max_answer_tokens, shard_index=shard_index, shard_count=shard_count,
                        num_epochs=num_epochs, pad_multiple=pad_multiple, prefetch_batches=prefetch_batches)
  return PromptLoader(records, tokenizer, config)


def sft_arrays(records: Sequence[Record], tokenizer: Any, *, style: prompts.Style = "cold", seq_len: int,
               max_prompt_tokens: int | None = None) -> dict[str, np.ndarray]:
  """Teacher-forcing arrays for pretraining on gold rationales (the synthetic source task, synthetic.py).

  Each row is prompt + gold rationale + `</think>` + gold answer + EOS (`prompts.sft_example`), right-padded to
  `seq_len`: `tokens_NxT` int32, `mask_NxT` (real tokens) and `loss_mask_NxT` (the completion tokens, the ones a
  next-token loss should score). A row longer than `seq_len` raises.
  """
  if not records:
    raise ValueError("sft_arrays got no records.")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prompts.eos_id(tokenizer)
  n = len(records)
  tokens_NxT = np.full((n, seq_len), pad_id, np.int32)
  mask_NxT = np.zeros((n, seq_len), bool)
  loss_mask_NxT = np.zeros((n, seq_len), bool)
  for row, record in enumerate(records):
    ids, loss = prompts.sft_example(record, tokenizer, style=style, max_prompt_tokens=max_prompt_tokens or seq_len)
    if len(ids) > seq_len:
      raise ValueError(f"{record.where()}: the SFT sequence has {len(ids)} tokens, over seq_len={seq_len}; "
                       "raise seq_len.")
    tokens_NxT[row, :len(ids)] = ids
    mask_NxT[row, :len(ids)] = True
    loss_mask_NxT[row, :len(ids)] = loss
  return dict(tokens_NxT=tokens_NxT, mask_NxT=mask_NxT, loss_mask_NxT=loss_mask_NxT)
