"""Deterministic linearisation of a record's context, and the rule that truncates it to a token budget (issue 6).

Linearisation (no randomness, no reordering):

* FinQA: the text before the table, one sentence per unit; the table, one row per unit, cells joined by ` | `
  (the header row first, as in the file); the text after the table, one sentence per unit.
* HotPotQA / MuSiQue: the paragraphs in file order; a paragraph starts with `title: ` and each of its sentences is a
  unit (a MuSiQue paragraph is one sentence-unit: the file does not split it).

Units are joined with a space inside a paragraph / text block and a newline between blocks and table rows.

**Truncation rule.** `fit_context` keeps the longest *prefix* of the units (document order) whose rendered prompt has
at most `max_prompt_tokens` tokens, counted with the real tokenizer on the real rendered prompt (chat template
included); units are never cut in the middle, and whatever does not fit is dropped from the end. If even the prompt
with no context exceeds the budget, it raises `ValueError`. The rule is monotone (more units never means fewer
tokens), so a binary search finds the prefix with O(log n) tokenisations.
"""
from __future__ import annotations

from typing import Callable, Sequence

from tsallis_jax.data.records import BudgetError, Record


def context_units(record: Record) -> list[tuple[int, str]]:
  """The context as (block, text) units in document order; units of one block are joined with spaces."""
  blocks: list[list[str]] = []

  def add_passage(passage, titled: bool) -> None:
    sentences = [s.strip() for s in passage.sentences if s.strip()]
    if sentences:
      if titled and passage.title:
        sentences[0] = f"{passage.title}: {sentences[0]}"
      blocks.append(sentences)

  if record.table:  # FinQA: text before the table, the table one row per block, text after the table
    passages = list(record.context)
    if passages:
      add_passage(passages[0], titled=False)
    blocks.extend([" | ".join(cell.strip() for cell in row)] for row in record.table)
    for passage in passages[1:]:
      add_passage(passage, titled=False)
  else:
    for passage in record.context:
      add_passage(passage, titled=True)
  return [(b, unit) for b, block in enumerate(blocks) for unit in block]


def join_units(units: Sequence[tuple[int, str]]) -> str:
  """Units joined: a space within a block, a newline between blocks."""
  out, last = [], None
  for block, text in units:
    if last is not None:
      out.append(" " if block == last else "\n")
    out.append(text)
    last = block
  return "".join(out)


def linearize(record: Record) -> str:
  """The whole context of `record` as text (no budget)."""
  return join_units(context_units(record))


def fit_context(record: Record, count_tokens: Callable[[str], int], max_prompt_tokens: int) -> tuple[str, int]:
  """The longest unit prefix of the context whose prompt fits `max_prompt_tokens` (see the module docstring).

  Args:
    record: the record whose context is linearised.
    count_tokens: maps a linearised context to the token count of the whole rendered prompt.
    max_prompt_tokens: the budget.

  Returns:
    (context_text, number of units dropped).
  """
  units = context_units(record)
  if count_tokens(join_units(units)) <= max_prompt_tokens:
    return join_units(units), 0
  base = count_tokens("")
  if base > max_prompt_tokens:
    raise BudgetError(f"{record.where()}: the prompt without any context already has {base} tokens, over "
                      f"max_prompt_tokens={max_prompt_tokens}; raise max_prompt_tokens (the config key "
                      "max_prompt_len).")
  lo, hi = 0, len(units) - 1  # invariant: the prefix of length lo fits, the one of length hi + 1 does not
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count_tokens(join_units(units[:mid])) <= max_prompt_tokens:
      lo = mid
    else:
      hi = mid - 1
  return join_units(units[:lo]), len(units) - lo
