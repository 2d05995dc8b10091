"""An executor for FinQA's programs (issue 6; ECOSYSTEM.md, FinQA), checked against the official evaluator, the
FinQA repository's `code/evaluate/evaluate.py` (`eval_program`, `process_row`, `str_to_num`).

A program is a comma-separated list of steps `op(arg1, arg2)`; step k's result is referred to later as `#k`.

* Operations: `add`, `subtract`, `multiply`, `divide`, `exp` (arg1 ** arg2), `greater` (the string "yes" or "no"),
  and the table operations `table_max`, `table_min`, `table_sum`, `table_average`, whose first argument names a
  table row and whose second is `none`; they reduce the row's cells after the first.
* Arguments: `#k`; `const_N` is N and `const_m1` is -1; a literal number may carry thousands commas and a trailing
  `%` (which divides by 100).
* Table rows, `table_cells="official"` (the default; as evaluate.py's `process_row`): the row is found by its first
  cell exactly; in each cell `$` is removed, the text from the first `(` on is dropped (`123 ( 45 )` reads 123,
  `( 40 )` reads nothing), commas are removed and a `%` divides by 100; if any cell is then not a number (an empty
  cell, `-`, `( 40 )`), the step is invalid (`ValueError`), as the official evaluator marks the program invalid.
  `table_cells="accounting"` is the lenient reading: the row name matches after lower-casing and collapsing spaces,
  `( 40 )` is -40 (the accounting convention), and cells that are still not numbers are skipped (a row with no
  numeric cell is invalid).
* The result of the last step, rounded to 5 decimals (FinQA's rounding), is the program's answer; `matches_exe_ans`
  compares it with the record's `exe_ans`.

Differences from evaluate.py that remain, each tested in tests/test_data_official.py: (1) `matches_exe_ans` rounds
the gold `exe_ans` to 5 decimals too (the official compares the rounded result with the stored value as is) and
compares yes/no case-insensitively; (2) literal arguments are read more leniently: `$` and `( x )` are accepted
(the official marks the program invalid) and `const_mN` / `const_N_M` are -N / N.M (the official reads only
`const_m1`; FinQA's constant vocabulary has no others); (3) programs are parsed by their `op(a, b)` steps rather
than by the official's token positions, so a table row name may contain `, ` or parentheses; (4) a table operation
on `#k` is invalid here (the official reuses the previous table step's row, or fails). Bad programs raise
`ValueError` naming the program and the step; the official's "invalid" is that `ValueError`.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

_STEP = re.compile(r"\s*([a-z_]+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)\s*(?:,|$)")
BINARY_OPS = ("add", "subtract", "multiply", "divide", "exp", "greater")
TABLE_OPS = ("table_max", "table_min", "table_sum", "table_average")

Value = float | str


def parse_steps(program: str) -> list[tuple[str, list[str]]]:
  """`"add(1, 2), divide(#0, 3)"` -> `[("add", ["1", "2"]), ("divide", ["#0", "3"])]`."""
  steps, pos = [], 0
  text = program.strip()
  while pos < len(text):
    m = _STEP.match(text, pos)
    if not m:
      raise ValueError(f"FinQA program {program!r}: cannot parse at character {pos} ({text[pos:pos + 20]!r}).")
    op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    if op in TABLE_OPS and len(args) > 2:  # a row name may itself contain commas
      args = [", ".join(args[:-1]), args[-1]]
    if len(args) != 2:
      raise ValueError(f"FinQA program {program!r}: step {len(steps)} `{m.group(0).strip()}` needs two arguments.")
    steps.append((op, args))
    pos = m.end()
  if not steps:
    raise ValueError(f"FinQA program {program!r} is empty.")
  return steps


def parse_number(text: str) -> float | None:
  """A literal or table cell as a float (`$`, commas, `( x )` negatives, trailing `%`), or None."""
  s = text.strip().replace("$", "").replace(",", "").replace(" ", "")
  negative = s.startswith("(") and s.endswith(")")
  if negative:
    s = s[1:-1]
  percent = s.endswith("%")
  if percent:
    s = s[:-1]
  try:
    x = float(s)
  except ValueError:
    return None
  if not math.isfinite(x):
    return None
  return (-x if negative else x) / (100.0 if percent else 1.0)


def _const(name: str) -> float:
  body = name[len("const_"):]
  sign = -1.0 if body.startswith("m") else 1.0
  body = body[1:] if body.startswith("m") else body
  try:
    return sign * float(body.replace("_", "."))
  except ValueError:
    raise ValueError(f"unknown FinQA constant {name!r}.") from None


def _norm_row(name: str) -> str:
  return " ".join(name.lower().split())


def official_cell(text: str) -> float | None:
  """A table cell as evaluate.py's `process_row` reads it (`$` removed, text from `(` on dropped), or None."""
  s = text.replace("$", "").strip().split("(")[0].strip().replace(",", "")
  try:
    return float(s)
  except ValueError:
    pass
  if "%" in s:
    try:
      return float(s.replace("%", "")) / 100.0
    except ValueError:
      return None
  return None


TABLE_CELLS = ("official", "accounting")


def execute(program: str, table: Sequence[Sequence[str]] = (), *, table_cells: str = "official") -> Value:
  """The program's answer: a float rounded to 5 decimals, or "yes" / "no" (see the module docstring)."""
  if table_cells not in TABLE_CELLS:
    raise ValueError(f"table_cells={table_cells!r}: use one of {TABLE_CELLS}")
  official = table_cells == "official"
  row_key = (lambda name: name.strip()) if official else _norm_row
  results: list[Value] = []
  rows = {row_key(row[0]): row[1:] for row in table if row}

  def arg(text: str, k: int) -> Value:
    if text.startswith("#"):
      j = int(text[1:]) if text[1:].isdigit() else -1
      if not 0 <= j < k:
        raise ValueError(f"FinQA program {program!r}: step {k} refers to {text}, which is not an earlier step.")
      return results[j]
    if text.startswith("const_"):
      return _const(text)
    x = parse_number(text)
    if x is None:
      raise ValueError(f"FinQA program {program!r}: step {k} argument {text!r} is not a number, #k or const_.")
    return x

  for k, (op, args) in enumerate(parse_steps(program)):
    if op in TABLE_OPS:
      key = row_key(args[0])
      if key not in rows:
        raise ValueError(f"FinQA program {program!r}: step {k} names row {args[0]!r}, not in the table "
                         f"(rows: {sorted(rows)}).")
      if official:
        cells = [official_cell(c) for c in rows[key]]
        if not cells or None in cells:
          bad = [c for c, x in zip(rows[key], cells) if x is None]
          raise ValueError(f"FinQA program {program!r}: step {k}: row {args[0]!r} has cells {bad} that are not a"
                           " number under the official rule (evaluate.py marks the program invalid; see"
                           " table_cells='accounting')")
      else:
        cells = [x for x in (parse_number(c) for c in rows[key]) if x is not None]
        if not cells:
          raise ValueError(f"FinQA program {program!r}: step {k}: row {args[0]!r} has no numeric cell.")
      results.append({"table_max": max, "table_min": min, "table_sum": sum,
                      "table_average": lambda v: sum(v) / len(v)}[op](cells))
      continue
    if op not in BINARY_OPS:
      raise ValueError(f"FinQA program {program!r}: step {k} uses unknown operation {op!r}; known: "
                       f"{BINARY_OPS + TABLE_OPS}.")
    a, b = arg(args[0], k), arg(args[1], k)
    if isinstance(a, str) or isinstance(b, str):
      raise ValueError(f"FinQA program {program!r}: step {k} applies {op} to a yes/no result.")
    if op == "add":
      results.append(a + b)
    elif op == "subtract":
      results.append(a - b)
    elif op == "multiply":
      results.append(a * b)
    elif op == "divide":
      if b == 0:
        raise ValueError(f"FinQA program {program!r}: step {k} divides by zero.")
      results.append(a / b)
    elif op == "exp":
      results.append(a ** b)
    else:
      results.append("yes" if a > b else "no")
  out = results[-1]
  return out if isinstance(out, str) else round(out, 5)


def matches_exe_ans(value: Value, exe_ans: float | str) -> bool:
  """FinQA execution accuracy for one program: equal after rounding both to 5 decimals ("yes"/"no" exactly)."""
  if isinstance(value, str) or isinstance(exe_ans, str):
    return str(value).strip().lower() == str(exe_ans).strip().lower()
  return round(float(value), 5) == round(float(exe_ans), 5)
