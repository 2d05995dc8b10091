"""The common record every dataset in this package becomes (issue 6).

One frozen `Record` per question, whatever its source: FinQA, HotPotQA, MuSiQue or a synthetic task. The gold answer
`answer` is the string the paper's exact-match reward compares against (spec 1.7); `aliases` are further strings the
official metrics accept (MuSiQue's `answer_aliases`). Optional fields carry what a dataset has and the others lack:
FinQA's table and gold program, HotPotQA's supporting facts, MuSiQue's answerability, a synthetic task's rationale.

`source` and `index` name the file and the position in it, so every error about a record can say where it came from.
A record read by the generic file task (`tsallis_jax.data.files`) also carries the row's other `columns` (name, text
pairs) and the run's `template`, the warm prompt it is asked with (`prompts.user_message`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from tsallis_jax.errors import InputError


class RecordError(InputError):
  """A record in a data file is malformed. The message names the file, the record (or line) and the field."""


class BudgetError(InputError):
  """A record's prompt or gold answer does not fit its token budget (`max_prompt_len` / `max_answer_len`)."""


@dataclasses.dataclass(frozen=True)
class Passage:
  """One titled passage: a HotPotQA / MuSiQue paragraph, or FinQA's text before / after the table."""
  title: str
  sentences: tuple[str, ...]

  @property
  def text(self) -> str:
    return " ".join(s.strip() for s in self.sentences if s.strip())


@dataclasses.dataclass(frozen=True)
class Record:
  """One question with its context and gold answer (see the module docstring).

  Fields: `id`; `question`; `answer` (the gold string the training reward and the teacher-forced weight use);
  `aliases` (further accepted answers); `context` (titled passages, linearised by data/context.py); `table` (FinQA's
  rows, header first) and `program` (its gold program); `supporting_facts` (title, sentence or paragraph index);
  `answerable`; `rationale` (a gold rationale, synthetic tasks only); `dataset` (picks the warm instructions and the
  evaluation group); `source`, `index` (file and position, for errors); `columns`, `template` (generic task).
  """
  id: str
  question: str
  answer: str
  aliases: tuple[str, ...] = ()
  context: tuple[Passage, ...] = ()
  table: tuple[tuple[str, ...], ...] = ()
  program: str | None = None
  supporting_facts: tuple[tuple[str, int], ...] = ()
  answerable: bool = True
  rationale: str | None = None
  dataset: str = ""
  source: str = ""
  index: int = -1
  columns: tuple[tuple[str, str], ...] = ()  # the row's other columns, as (name, text), for the prompt template
  template: str = ""  # the warm prompt template (`prompts.user_message`); "" = the dataset's own instructions

  @property
  def answers(self) -> tuple[str, ...]:
    """The gold answer followed by its aliases, without duplicates (order kept)."""
    return tuple(dict.fromkeys((self.answer,) + tuple(self.aliases)))

  def where(self) -> str:
    """`file, record INDEX (id ID)` for error messages."""
    return f"{self.source or '<memory>'}, record {self.index} (id {self.id!r})"

  def to_json(self) -> str:
    """A JSON string that `Record.from_json` reads back to an equal record."""
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str | bytes) -> "Record":
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    d = json.loads(text)
    d["aliases"] = tuple(d["aliases"])
    d["context"] = tuple(Passage(p["title"], tuple(p["sentences"])) for p in d["context"])
    d["table"] = tuple(tuple(row) for row in d["table"])
    d["supporting_facts"] = tuple((str(t), int(i)) for t, i in d["supporting_facts"])
    d["columns"] = tuple((str(k), str(v)) for k, v in d.get("columns", ()))  # absent in files written before it
    return cls(**d)


def require(raw: dict[str, Any], field: str, *, source: str, index: int, types: type | tuple[type, ...]) -> Any:
  """Returns `raw[field]`, or raises `RecordError` naming the file, the record index / id and the missing field."""
  rid = raw.get("id", raw.get("_id", "?")) if isinstance(raw, dict) else "?"
  if not isinstance(raw, dict):
    raise RecordError(f"{source}, record {index}: expected a JSON object, got {type(raw).__name__}; "
                      "is this the official release file?")
  if field not in raw:
    raise RecordError(f"{source}, record {index} (id {rid!r}): missing field {field!r}; "
                      "the file does not follow the official schema (re-download it unchanged).")
  value = raw[field]
  if not isinstance(value, types):
    want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
    raise RecordError(f"{source}, record {index} (id {rid!r}): field {field!r} should be {want}, "
                      f"got {type(value).__name__}.")
  return value
