"""Metric writers (process 0 only): JSON lines, TensorBoard, optional W&B, a console line and a tqdm progress bar.

One `MetricWriter` per run. `write(step, metrics)` appends a row to `workdir/metrics.jsonl` and hands it to each
backend; `completions(step, split, rows)` appends the evaluation's sampled completions to `workdir/completions.jsonl`
(and to each backend as text); `note(text)` prints one line. Backends share one small interface (`scalars`, `text`,
`close`): TensorBoard (`tensorboard=True` or `report_to` naming it) and W&B (`report_to` naming "wandb"; the `wandb`
package must be installed, it is not a dependency).

**Names.** Where a quantity is the one TRL logs, the written name is TRL's (`LOGGED_NAMES`: the train step computes
`reward/mean`, the files say `reward`); every other name is ours (`jq/amp_mean`, `jq/weight_ess`, `weight/mean`,
`groups/frac_all_wrong`, ...). The README's "Metric names" table lists the mapping and verl's names.

**Console.** With no progress bar on screen (`progress_bar=off`, or `auto` without a TTY), every written train row
prints `step 40/200 | loss 0.123 | reward 0.25 | w-bar 0.31 | kl 0.01 | entropy 1.2 | 812 tok/s | ETA 1m20s` (w-bar:
the mean likelihood weight of GARL / PAFT; ETA from the mean time per step so far) and every evaluation row its
p@1 / pass@k / maj@k.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from tsallis_jax.train.checkpoint import is_remote, resolve_workdir

# Our internal name -> the name TRL's GRPOTrainer logs for the same quantity (verl's in the README's table).
LOGGED_NAMES = {
    "reward/mean": "reward", "reward/std": "reward_std", "groups/frac_zero_std": "frac_reward_zero_std",
    "gen/len_mean": "completions/mean_length", "gen/len_max": "completions/max_length",
    "gen/truncated_frac": "completions/clipped_ratio", "kl/ref": "kl", "policy/entropy": "entropy",
}
_CONSOLE = (("loss", "loss"), ("reward", "reward"), ("weight/mean", "w-bar"), ("kl", "kl"), ("entropy", "entropy"))


def _to_python(value: Any) -> float | int | str:
  if isinstance(value, (str, bool)):
    return value
  arr = np.asarray(value)
  if arr.dtype.kind in "iu":
    return int(arr)
  return float(arr)


def _duration(seconds: float) -> str:
  s = int(round(max(seconds, 0.0)))
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Jsonl:
  """One JSON-lines file, truncated to rows with step <= `keep_through_step` on open (see `MetricWriter`)."""

  def __init__(self, path: epath.Path, rewrite: bool, keep_through_step: int):
    self.path, self.rewrite = path, rewrite
    kept = _truncate_after(path, keep_through_step)
    self.lines = kept if rewrite else []
    self.file = None if rewrite else path.open("a", encoding="utf-8")

  def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
    lines = [json.dumps(row, allow_nan=True) + "\n" for row in rows]
    if self.rewrite:
      self.lines.extend(lines)
      _write_lines(self.path, self.lines)
    else:
      self.file.writelines(lines)
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


class TensorBoardBackend:
  """Scalars and text into `workdir/tb/` (tensorboardX)."""

  def __init__(self, workdir: epath.Path, start_step: int):
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None)

  def scalars(self, step: int, row: Mapping[str, Any]) -> None:
    for k, v in row.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._tb.add_scalar(k.replace("@", "_at_"), v, step)  # TensorBoard tags allow no "@"

  def text(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]]) -> None:
    self._tb.add_text(tag, _markdown_table(rows), step)

  def close(self) -> None:
    self._tb.close()


class WandbBackend:
  """The same rows into a W&B run (project $WANDB_PROJECT or "tsallis_jax"); the run id is kept in the workdir, so a
  resumed run continues its W&B run."""

  def __init__(self, workdir: epath.Path, run_name: str, config: Mapping[str, Any] | None):
    try:
      import wandb
    except ImportError:
      from tsallis_jax.train.config import ConfigError
      raise ConfigError("report_to names wandb, but the wandb package is not installed: pip install wandb (or drop"
                        " wandb from report_to)") from None
    self._wandb = wandb
    id_path = workdir / "wandb_run_id"
    run_id = id_path.read_text().strip() if id_path.exists() else wandb.util.generate_id()
    id_path.write_text(run_id)
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tsallis_jax"), name=run_name or None,
                           id=run_id, resume="allow", config=dict(config or {}), dir=str(workdir))

  def scalars(self, step: int, row: Mapping[str, Any]) -> None:
    self._run.log({k: v for k, v in row.items() if k != "step"}, step=step)

  def text(self, step: int, tag: str, rows: Sequence[Mapping[str, Any]]) -> None:
    if rows:
      columns = list(rows[0])
      table = self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
      self._run.log({tag: table}, step=step)

  def close(self) -> None:
    self._run.finish()


class MetricWriter:
  """Writes `{step, **metrics}` to `workdir/metrics.jsonl` and the backends; a no-op on processes other than 0.

  The JSONL files are truncated to the rows with step <= `keep_through_step` (the restored step on resume, -1 for a
  fresh run), so that the files of a resumed run equal those of an uninterrupted run.

  Two ways to add a row, chosen once by `rewrite` (default: `is_remote(workdir)`):
    - append (local workdir): the file stays open in append mode and each row is appended and flushed, so a killed
      run keeps every row written before the kill;
    - rewrite (object-store workdir such as `gs://`, which cannot append): the kept rows and the new ones are held
      in memory and the whole file is rewritten at each `write`. Both produce the same file.
  """

  def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, progress_bar: str = "auto",
               total_steps: int = 0, start_step: int = 0, keep_through_step: int = -1,
               rewrite: bool | None = None, report_to: str = "", run_name: str = "",
               config: Mapping[str, Any] | None = None, console_log: bool = True):
    self.enabled = jax.process_index() == 0
    self.console_log = console_log
    workdir = resolve_workdir(workdir)
    self.path = workdir / "metrics.jsonl"
    self.rewrite = is_remote(workdir) if rewrite is None else rewrite
    self.total_steps = total_steps
    self.backends: list[Any] = []
    self._bar = None
    self._metrics: _Jsonl | None = None
    self._completions: _Jsonl | None = None
    self._clock: tuple[float, int] | None = None  # (time, step) of the first train row, for the ETA
    if not self.enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    self._metrics = _Jsonl(self.path, self.rewrite, keep_through_step)
    self._completions = _Jsonl(workdir / "completions.jsonl", self.rewrite, keep_through_step)
    names = {b.strip() for b in report_to.split(",")}
    if tensorboard or "tensorboard" in names:
      self.backends.append(TensorBoardBackend(workdir, start_step))
    if "wandb" in names:
      self.backends.append(WandbBackend(workdir, run_name, config))
    show = {"on": True, "off": False}.get(progress_bar, sys.stderr.isatty() and not os.environ.get("CI"))
    if show:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

  @property
  def _file(self):
    return self._metrics.file if self._metrics is not None else None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    named = {LOGGED_NAMES.get(k, k): _to_python(v) for k, v in metrics.items()}
    row = {"step": int(step), **dict(sorted(named.items()))}
    self._metrics.append([row])
    for backend in self.backends:
      backend.scalars(step, row)
    if self._bar is None and self.console_log:
      self.note(self._console_line(step, named))

  def _console_line(self, step: int, row: Mapping[str, Any]) -> str:
    if "loss" not in row:  # an evaluation row: its headline metrics (not the per-bucket ones)
      shown = [f"{k} {v:.4g}" for k, v in row.items() if k.count("/") == 1 and "@" in k]
      return " | ".join([f"step {step}"] + shown)
    now = time.perf_counter()
    if self._clock is None:
      self._clock = (now, step)
    parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
    parts += [f"{label} {row[k]:.4g}" for k, label in _CONSOLE if isinstance(row.get(k), (int, float))]
    if "perf/tokens_per_s" in row:
      parts.append(f"{row['perf/tokens_per_s']:.0f} tok/s")
    t0, s0 = self._clock
    if self.total_steps and step > s0:
      parts.append(f"ETA {_duration((now - t0) / (step - s0) * (self.total_steps - step))}")
    return " | ".join(parts)

  def completions(self, step: int, split: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Appends sampled completions (`{id, sample, completion, answer, reward, gold}` each) to completions.jsonl and
    the backends' text (`{split}/completions`)."""
    if not self.enabled or not rows:
      return
    self._completions.append([{"step": int(step), "split": split, **r} for r in rows])
    for backend in self.backends:
      backend.text(step, f"{split}/completions", rows)

  def note(self, text: str) -> None:
    """One line on the console (process 0), above the progress bar when one is shown."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def progress(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._bar is not None:
      self._bar.n = step
      shown = {label: f"{_to_python(metrics[k]):.3g}" for k, label in (
          ("reward/mean", "reward"), ("weight/mean", "w-bar"), ("loss", "loss")) if k in metrics}
      self._bar.set_postfix(shown, refresh=True)

  def close(self) -> None:
    if not self.enabled:
      return
    for f in (self._metrics, self._completions):
      f.close()
    for backend in self.backends:
      backend.close()
    if self._bar is not None:
      self._bar.close()


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  if not rows:
    return ""
  columns = list(rows[0])

  def cell(v: Any) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")

  lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


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
  """Reads a metrics.jsonl (or completions.jsonl) file into a list of dicts (tests and the demo's table use it)."""
  with epath.Path(path).open("r", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
