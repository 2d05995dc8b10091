"""An executor for FinQA's gold programs (issue 6; ECOSYSTEM.md, FinQA).

A program is a comma-separated list of steps `op(arg1, arg2)`; step k's result is referred to later as `#k`.

* Operations: `add`, `subtract`, `multiply`, `divide`, `exp` (arg1 ** arg2), `greater` (the string "yes" or "no"),
  and the table operations `table_max`, `table_min`, `table_sum`, `table_average`, whose first argument names a
  table row (the row's first cell, matched after lower-casing and collapsing spaces) and whose second is `none`;
  they reduce the row's numeric cells.
* Arguments: `#k`; `const_N` is N and `const_mN` is -N (`const_1_5` is 1.5); a literal number may carry `$`, thousands
  commas and a trailing `%` (which divides by 100).
* Table cells: `$`, commas and spaces are removed, `( 40 )` is read as -40 (the accounting convention), a trailing
  `%` divides by 100; a cell that is still not a number is skipped (a row with no numeric cell raises).
* The result of the last step, rounded to 5 decimals (FinQA's rounding), is the program's answer; `matches_exe_ans`
  compares it with the record's `exe_ans` after the same rounding.

Bad programs raise `ValueError` naming the program and the step.
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


def execute(program: str, table: Sequence[Sequence[str]] = ()) -> Value:
  """The program's answer: a float rounded to 5 decimals, or "yes" / "no" (see the module docstring)."""
  results: list[Value] = []
  rows = {_norm_row(row[0]): row[1:] for row in table if row}

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
      key = _norm_row(args[0])
      if key not in rows:
        raise ValueError(f"FinQA program {program!r}: step {k} names row {args[0]!r}, not in the table "
                         f"(rows: {sorted(rows)}).")
      cells = [x for x in (parse_number(c) for c in rows[key]) if x is not None]
      if not cells:
        raise ValueError(f"FinQA program {program!r}: step {k}: row {args[0]!r} has no numeric cell.")
      results.append({"table_max": max, "table_min": min, "table_sum": math.fsum,
                      "table_average": lambda v: math.fsum(v) / len(v)}[op](cells))
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
