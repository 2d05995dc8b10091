"""Metric writers: JSON lines and TensorBoard event files (process 0 only) and a tqdm progress bar.

Metric names follow the ecosystem (`../shared/design/ECOSYSTEM.md`): reward/mean, groups/frac_all_wrong,
gen/len_mean, grad_norm, learning_rate, jq/amp_mean, eval/maj@16, ...
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from tsallis_jax.train.checkpoint import is_remote, resolve_workdir


def _to_python(value: Any) -> float | int | str:
  if isinstance(value, (str, bool)):
    return value
  arr = np.asarray(value)
  if arr.dtype.kind in "iu":
    return int(arr)
  return float(arr)


class MetricWriter:
  """Writes `{step, **metrics}` to `workdir/metrics.jsonl` and `workdir/tb/`; a no-op on processes other than 0.

  The JSONL file is truncated to the rows with step <= `keep_through_step` (the restored step on resume, -1 for a
  fresh run), so that the file of a resumed run equals the file of an uninterrupted run.

  Two ways to add a row, chosen once by `rewrite` (default: `is_remote(workdir)`):
    - append (local workdir): the file stays open in append mode and each row is appended and flushed, so a killed
      run keeps every row written before the kill;
    - rewrite (object-store workdir such as `gs://`, which cannot append): the kept rows and the new ones are held
      in memory and the whole file is rewritten at each `write`. Both produce the same file.
  """

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, progress_bar: str = "auto",
               total_steps: int = 0, start_step: int = 0, keep_through_step: int = -1,
               rewrite: bool | None = None):
    self.enabled = jax.process_index() == 0
    workdir = resolve_workdir(workdir)
    self.path = workdir / "metrics.jsonl"
    self.rewrite = is_remote(workdir) if rewrite is None else rewrite
    self._tb = None
    self._bar = None
    self._file = None
    self._lines: list[str] = []
    if not self.enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    kept = _truncate_after(self.path, keep_through_step)
    if self.rewrite:
      self._lines = kept
    else:
      self._file = self.path.open("a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None)
    show = {"on": True, "off": False}.get(progress_bar, sys.stderr.isatty() and not os.environ.get("CI"))
    if show:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in sorted(metrics.items())}}
    line = json.dumps(row, allow_nan=True) + "\n"
    if self.rewrite:
      self._lines.append(line)
      _write_lines(self.path, self._lines)
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k.replace("@", "_at_"), v, step)  # TensorBoard tags allow no "@"

  def progress(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._bar is not None:
      self._bar.n = step
      shown = {k: f"{_to_python(metrics[k]):.3g}" for k in ("reward/mean", "jq/weight_mean", "loss")
               if k in metrics}
      self._bar.set_postfix(shown, refresh=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def _truncate_after(path: epath.Path, step: int) -> list[str]:
  """Drops JSONL rows whose step is greater than `step` (written after the checkpoint we resume from).

  Rewrites the file when it exists and returns the kept lines.
  """
  if not path.exists():
    return []
  with path.open("r", encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (json.JSONDecodeError, KeyError):  # a line cut by a kill mid-write
      continue
  _write_lines(path, kept)
  return kept


def _write_lines(path: epath.Path, lines: list[str]) -> None:
  """Replaces the file's content with `lines` (one write, which object stores support)."""
  with path.open("w", encoding="utf-8") as f:
    f.writelines(lines)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file into a list of dicts (tests and the demo's table use it)."""
  with epath.Path(path).open("r", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
