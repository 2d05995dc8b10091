"""Records from your own data: a JSONL / JSON / CSV / Parquet file or a `datasets` dataset, with a column mapping.

`read_records(source, columns)` reads one source into `Record`s (records.py); the generic task `task="file"`
(`tsallis_jax/train/tasks.py`) calls it once per split.

**Sources.** The format follows the file's extension:

* `.jsonl`: one JSON object per line (blank lines skipped); an error names the file and the line.
* `.json`: a JSON list of objects; an error names the file and the record index.
* `.csv` (`.tsv`): a header row, then one row per record (Python's `csv` module); an error names the file and line.
* `.parquet`: read with `pyarrow` (tensorflow-datasets, a dependency, brings it); an error names the file and row.
* anything else (`hf:org/name`, a folder written by `Dataset.save_to_disk`-compatible loaders, a local dataset
  script): `datasets.load_dataset(name, config, split=...)` when the `datasets` library is installed (the Hub needs
  network; a local path does not). The split is `@split` at the end of the source (`hf:gsm8k@test`), else the split
  the task asks for.

**Columns.** `columns` maps a role to the column that holds it (`"question=q,answer=a,aliases=alts,context=ctx"`); a
role not named reads the column of its own name. Roles: `question` (required text), `answer` (required: text or a
number), `aliases` (optional: a list of strings; in a CSV cell a JSON list or `|`-separated text), `context`
(optional: a string, a list of strings, or a list of `{"title", "text"}` objects), `id` (optional; default
`<file>:<index>`) and `split` (optional: the column that assigns a row to train / val / test). Every other column
is kept in `Record.columns` as text, for the prompt template.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterator

from tsallis_jax.data.records import Passage, Record, RecordError
from tsallis_jax.errors import InputError, MissingFileError

ROLES = ("question", "answer", "aliases", "context", "id", "split")
FILE_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def parse_columns(text: str) -> dict[str, str]:
  """`"question=q,answer=a"` -> {role: column} for every role (unnamed roles read the column of their own name)."""
  mapping = {role: role for role in ROLES}
  for item in filter(None, (s.strip() for s in text.split(","))):
    role, sep, column = item.partition("=")
    role, column = role.strip(), column.strip()
    if not sep or not column:
      raise InputError(f"data_columns item {item!r} is not role=column (e.g. question=q,answer=a)")
    if role not in ROLES:
      raise InputError(f"data_columns role {role!r} is unknown; roles: {list(ROLES)}")
    mapping[role] = column
  return mapping


def _split_suffix(source: str) -> tuple[str, str | None]:
  base, at, split = source.rpartition("@")
  return (base, split) if at and split and "/" not in split else (source, None)


def is_file_source(source: str) -> bool:
  return source.lower().endswith(FILE_FORMATS)


def read_rows(source: str, *, split: str | None = None, hf_config: str = "", label: str | None = None
              ) -> Iterator[tuple[str, int, Any]]:
  """Yields (where, index, row) for each row of `source` (see the module docstring); `where` names the file (its
  base name, or `label`) and the line. The one JSON / CSV / Parquet reader: the official datasets read through it."""
  if is_file_source(source):
    if not os.path.isfile(source):
      raise MissingFileError(f"data file {source!r} does not exist; give a .jsonl, .json, .csv or .parquet path")
    name, ext = label or os.path.basename(source), os.path.splitext(source)[1].lower()
    if ext == ".jsonl":
      with open(source, encoding="utf-8") as f:
        index = 0
        for lineno, line in enumerate(f, start=1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise RecordError(f"{name}, line {lineno}: not valid JSON ({e.msg})") from None
          yield f"{name}, line {lineno}", index, row
          index += 1
    elif ext == ".json":
      with open(source, encoding="utf-8") as f:
        try:
          rows = json.load(f)
        except json.JSONDecodeError as e:
          raise RecordError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
      if not isinstance(rows, list):
        raise RecordError(f"{name}: expected a JSON list of objects, got {type(rows).__name__} (or use .jsonl)")
      for index, row in enumerate(rows):
        yield f"{name}, record {index}", index, row
    elif ext in (".csv", ".tsv"):
      with open(source, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        for index, row in enumerate(reader):
          if None in row or None in row.values():
            raise RecordError(f"{name}, line {reader.line_num}: {len(row) - (None in row)} header columns but a"
                              " different number of cells (quote cells that contain the delimiter)")
          yield f"{name}, line {reader.line_num}", index, row
    else:
      try:
        import pyarrow.parquet as pq
      except ImportError:
        raise InputError(f"{name}: reading Parquet needs pyarrow: pip install pyarrow") from None
      for index, row in enumerate(pq.read_table(source).to_pylist()):
        yield f"{name}, row {index}", index, row
    return
  base, at_split = _split_suffix(source)
  split = at_split or split
  try:
    import datasets
  except ImportError:
    raise InputError(f"data source {source!r} is not a .jsonl / .json / .csv / .parquet file, and reading a datasets"
                     " dataset needs the `datasets` library: pip install datasets") from None
  name = base.removeprefix("hf:")
  try:
    ds = datasets.load_dataset(name, hf_config or None, split=split)
  except FileNotFoundError as e:
    raise MissingFileError(f"datasets.load_dataset({name!r}, split={split!r}): {e}") from None
  for index, row in enumerate(ds):
    yield f"{name}[{split}], row {index}", index, row


def _text(value: Any) -> str | None:
  if isinstance(value, str):
    return value
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float) and math.isfinite(value):
    from tsallis_jax.data.official import format_number
    return format_number(value)
  return None


def _aliases(value: Any, where: str) -> tuple[str, ...]:
  if value is None or value == "":
    return ()
  if isinstance(value, str):
    if value.lstrip().startswith("["):
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise RecordError(f"{where}: aliases cell is not a JSON list ({e.msg})") from None
    else:
      return tuple(a.strip() for a in value.split("|") if a.strip())
  if not isinstance(value, (list, tuple)) or any(_text(a) is None for a in value):
    raise RecordError(f"{where}: aliases should be a list of strings, got {value!r:.80}")
  return tuple(_text(a).strip() for a in value if _text(a).strip())


def _context(value: Any, where: str) -> tuple[Passage, ...]:
  if value is None or value == "":
    return ()
  if isinstance(value, str):
    return (Passage("", (value,)),)
  if isinstance(value, (list, tuple)):
    out = []
    for j, item in enumerate(value):
      if isinstance(item, str):
        out.append(Passage("", (item,)))
      elif isinstance(item, dict) and isinstance(item.get("text"), str):
        out.append(Passage(str(item.get("title") or ""), (item["text"],)))
      else:
        raise RecordError(f"{where}: context[{j}] should be a string or {{\"title\", \"text\"}}, got {item!r:.80}")
    return tuple(out)
  raise RecordError(f"{where}: context should be text or a list of passages, got {type(value).__name__}")


def to_record(row: Any, columns: dict[str, str], *, where: str, source: str, index: int, dataset: str) -> Record:
  """One `Record` from one row; raises `RecordError` naming `where` (file and line) and the column."""
  if not isinstance(row, dict):
    raise RecordError(f"{where}: expected an object with named columns, got {type(row).__name__}")
  values = {}
  for role in ("question", "answer"):
    column = columns[role]
    if column not in row:
      raise RecordError(f"{where}: missing column {column!r} ({role}); columns: {sorted(row)}. Map yours with"
                        f" data_columns={role}=<column>")
    text = _text(row[column])
    if text is None or not text.strip():
      raise RecordError(f"{where}: column {column!r} ({role}) should be non-empty text or a number, got"
                        f" {row[column]!r:.80}")
    values[role] = text.strip()
  rid = _text(row.get(columns["id"])) or f"{source}:{index}"
  used = {columns[r] for r in ROLES}
  extra = tuple((k, v if isinstance(v, str) else json.dumps(v)) for k, v in row.items() if k not in used)
  aliases = tuple(a for a in _aliases(row.get(columns["aliases"]), where) if a != values["answer"])
  return Record(id=rid, question=values["question"], answer=values["answer"], aliases=aliases,
                context=_context(row.get(columns["context"]), where), dataset=dataset, source=source, index=index,
                columns=extra)


def read_records(source: str, columns: dict[str, str] | None = None, *, dataset: str = "file",
                 split: str | None = None, hf_config: str = "") -> list[tuple[Record, str | None]]:
  """All rows of `source` as (record, the row's split-column value or None); see the module docstring."""
  columns = columns or parse_columns("")
  if is_file_source(source):
    name = os.path.basename(source)
  else:
    base, at_split = _split_suffix(source)
    name = f"{base.removeprefix('hf:')}[{at_split or split}]"
  out = []
  for where, index, row in read_rows(source, split=split, hf_config=hf_config):
    record = to_record(row, columns, where=where, source=name, index=index, dataset=dataset)
    part = row.get(columns["split"]) if isinstance(row, dict) else None
    out.append((record, None if part is None else str(part).strip().lower()))
  return out
