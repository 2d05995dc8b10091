"""Plain-Python readers of the official FinQA, HotPotQA and MuSiQue release files (issue 6).

Each reader takes the path of one unchanged official file and returns `Record`s (records.py); the TFDS builders
(builders.py) call the same readers. Field facts: `../shared/design/ECOSYSTEM.md`.

* FinQA `{train,dev,test}.json`: a JSON list; `id`, `pre_text`, `post_text`, `table`, `qa.{question, program,
  exe_ans}` (and `qa.answer`, the answer string annotators wrote). The gold answer is `qa.answer` when present and
  non-empty, else `exe_ans` formatted by `format_number`; the other form is kept as an alias.
* HotPotQA `hotpot_train_v1.1.json`, `hotpot_dev_distractor_v1.json`: a JSON list; `_id`, `question`, `answer`,
  `context: [[title, [sentences]]]`, `supporting_facts: [[title, sent_id]]`.
* MuSiQue `musique_{ans,full}_v1.0_{train,dev,test}.jsonl`: one JSON object per line; `id`, `paragraphs: [{idx,
  title, paragraph_text, is_supporting}]`, `question`, `answer`, `answer_aliases`, `answerable`. The supporting
  facts of a MuSiQue record are `(title, idx)` of its supporting paragraphs.

Malformed records. With `on_error="raise"` (the default) the first malformed record raises `RecordError` naming the
file, the record index and id, and the missing or mistyped field. With `on_error="skip"` malformed records are
dropped, each one logged at WARNING, and the reader logs the count (and returns it via `read_official(...,
return_skipped=True)`). Nothing is dropped silently. Official test files without answers (MuSiQue's test split,
HotPotQA's test) are rejected as malformed: the answer is a required field.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Literal

from tsallis_jax.data import files
from tsallis_jax.data.records import Passage, Record, RecordError, require
from tsallis_jax.errors import MissingFileError

log = logging.getLogger(__name__)
OnError = Literal["raise", "skip"]


def format_number(x: float) -> str:
  """A float as a short decimal string: at most 5 decimals (FinQA's rounding), no trailing zeros."""
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
    raise ValueError(f"format_number expects a finite number, got {x!r}.")
  text = f"{round(float(x), 5):.5f}".rstrip("0").rstrip(".")
  return "0" if text in ("-0", "") else text


def _strings(raw: dict, field: str, source: str, index: int) -> tuple[str, ...]:
  value = require(raw, field, source=source, index=index, types=list)
  if not all(isinstance(v, str) for v in value):
    raise RecordError(f"{source}, record {index} (id {raw.get('id', raw.get('_id', '?'))!r}): field {field!r} "
                      "should be a list of strings.")
  return tuple(value)


def finqa_record(raw: Any, source: str, index: int) -> Record:
  """One FinQA record from its official JSON object."""
  rid = require(raw, "id", source=source, index=index, types=str)
  pre = _strings(raw, "pre_text", source, index)
  post = _strings(raw, "post_text", source, index)
  table = require(raw, "table", source=source, index=index, types=list)
  if not all(isinstance(row, list) for row in table):
    raise RecordError(f"{source}, record {index} (id {rid!r}): field 'table' should be a list of rows (lists).")
  qa = require(raw, "qa", source=source, index=index, types=dict)
  qa_where = dict(qa, id=rid)
  question = require(qa_where, "question", source=source + " [qa]", index=index, types=str)
  program = require(qa_where, "program", source=source + " [qa]", index=index, types=str)
  exe_ans = require(qa_where, "exe_ans", source=source + " [qa]", index=index, types=(int, float, str))
  exe_text = format_number(exe_ans) if isinstance(exe_ans, (int, float)) and not isinstance(exe_ans, bool) \
      else str(exe_ans).strip()
  answer = str(qa.get("answer") or "").strip()
  aliases = (exe_text,) if answer and exe_text != answer else ()
  if not answer:
    answer = exe_text
  return Record(id=rid, question=question.strip(), answer=answer, aliases=aliases,
                context=(Passage("pre_text", pre), Passage("post_text", post)),
                table=tuple(tuple(str(c) for c in row) for row in table), program=program, dataset="finqa",
                source=source, index=index)


def hotpotqa_record(raw: Any, source: str, index: int) -> Record:
  """One HotPotQA record from its official JSON object."""
  rid = require(raw, "_id", source=source, index=index, types=str)
  question = require(raw, "question", source=source, index=index, types=str)
  answer = require(raw, "answer", source=source, index=index, types=str)
  context = require(raw, "context", source=source, index=index, types=list)
  passages = []
  for j, item in enumerate(context):
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)):
      raise RecordError(f"{source}, record {index} (id {rid!r}): context[{j}] should be [title, [sentences]].")
    passages.append(Passage(item[0], tuple(str(s) for s in item[1])))
  facts = require(raw, "supporting_facts", source=source, index=index, types=list)
  if not all(isinstance(f, list) and len(f) == 2 and isinstance(f[1], int) for f in facts):
    raise RecordError(f"{source}, record {index} (id {rid!r}): supporting_facts should be [[title, sent_id]].")
  return Record(id=rid, question=question.strip(), answer=answer.strip(), context=tuple(passages),
                supporting_facts=tuple((str(t), int(i)) for t, i in facts), dataset="hotpotqa", source=source,
                index=index)


def musique_record(raw: Any, source: str, index: int) -> Record:
  """One MuSiQue record from its official JSON object."""
  rid = require(raw, "id", source=source, index=index, types=str)
  question = require(raw, "question", source=source, index=index, types=str)
  answer = require(raw, "answer", source=source, index=index, types=str)
  aliases = _strings(raw, "answer_aliases", source, index)
  paragraphs = require(raw, "paragraphs", source=source, index=index, types=list)
  passages, facts = [], []
  for j, p in enumerate(paragraphs):
    where = dict(p, id=rid) if isinstance(p, dict) else p
    for field, types in (("title", str), ("paragraph_text", str), ("idx", int)):
      require(where, field, source=f"{source} [paragraphs[{j}]]", index=index, types=types)
    passages.append(Passage(p["title"], (p["paragraph_text"],)))
    if p.get("is_supporting"):
      facts.append((p["title"], int(p["idx"])))
  answerable = raw.get("answerable", True)
  if not isinstance(answerable, bool):
    raise RecordError(f"{source}, record {index} (id {rid!r}): field 'answerable' should be true or false.")
  return Record(id=rid, question=question.strip(), answer=answer.strip(),
                aliases=tuple(a.strip() for a in aliases if a.strip() and a.strip() != answer.strip()),
                context=tuple(passages), supporting_facts=tuple(facts), answerable=answerable, dataset="musique",
                source=source, index=index)


READERS: dict[str, Callable[[Any, str, int], Record]] = {
    "finqa": finqa_record, "hotpotqa": hotpotqa_record, "musique": musique_record}


def _load(path: str) -> list[Any]:
  """The raw records of an official .json (a list) or .jsonl file, read by `files.read_rows`; errors name the path."""
  if not os.path.exists(path):
    raise MissingFileError(f"{path} does not exist; see builders.MANUAL_DOWNLOAD_INSTRUCTIONS for where to get "
                            "the official files.")
  return [row for _, _, row in files.read_rows(path, label=path)]


def read_official(dataset: str, path: str, *, on_error: OnError = "raise",
                  return_skipped: bool = False) -> list[Record] | tuple[list[Record], int]:
  """All records of one official file of `dataset` ("finqa", "hotpotqa" or "musique"); see the module docstring."""
  if dataset not in READERS:
    raise ValueError(f"unknown dataset {dataset!r}; use one of {sorted(READERS)}.")
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error={on_error!r}: use 'raise' or 'skip'.")
  source = os.path.basename(path)
  records, skipped = [], 0
  for index, raw in enumerate(_load(path)):
    try:
      records.append(READERS[dataset](raw, source, index))
    except RecordError as e:
      if on_error == "raise":
        raise
      skipped += 1
      log.warning("skipping malformed record: %s", e)
  if skipped:
    log.warning("%s: skipped %d malformed record(s) of %d", source, skipped, skipped + len(records))
  return (records, skipped) if return_skipped else records
