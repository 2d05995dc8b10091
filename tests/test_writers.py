"""The metric writer: TRL names in the files, the console line, completions.jsonl with TensorBoard text, and the W&B
backend behind the same interface (a fake `wandb` module: the package is optional and not installed here)."""
import json
import re
import sys
import types

import numpy as np
import pytest

from tsallis_jax.data.records import Record
from tsallis_jax.train import evaluate as eval_lib
from tsallis_jax.train import writers
from tsallis_jax.train.config import ConfigError, TrainConfig
from tsallis_jax.train.writers import MetricWriter, read_metrics

TRAIN = {"loss": np.float32(0.125), "reward/mean": 0.25, "reward/std": 0.5, "groups/frac_zero_std": 0.75,
         "weight/mean": 0.3, "kl/ref": 0.01, "policy/entropy": 1.2, "gen/len_mean": 9.0, "gen/truncated_frac": 0.0,
         "jq/amp_mean": 2.0, "perf/tokens_per_s": 812.4, "grad_norm": 1.0}


def test_files_use_trl_names_and_console_line_has_eta(tmp_path, capsys, monkeypatch):
  clock = iter([100.0, 110.0])
  monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
  writer = MetricWriter(str(tmp_path), tensorboard=False, progress_bar="off", total_steps=200)
  writer.write(20, TRAIN)
  writer.write(40, TRAIN)
  writer.write(40, {"eval/p@1": 0.5, "eval/pass@4": 0.75, "eval/maj@4": 0.5, "eval/hard/p@1": 0.0})
  writer.close()
  row = read_metrics(str(tmp_path / "metrics.jsonl"))[0]
  for ours, trl in writers.LOGGED_NAMES.items():
    assert (ours in TRAIN) <= (trl in row and ours not in row), (ours, trl)
  assert {"reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "completions/mean_length",
          "completions/clipped_ratio", "weight/mean", "jq/amp_mean", "grad_norm"} <= set(row)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "step 20/200 | loss 0.125 | reward 0.25 | w-bar 0.3 | kl 0.01 | entropy 1.2 | 812 tok/s"
  assert lines[1].endswith("| 812 tok/s | ETA 1m20s")  # 10 s per 20 steps, 160 steps to go
  assert lines[2] == "step 40 | eval/p@1 0.5 | eval/pass@4 0.75 | eval/maj@4 0.5"
  writer.note("resumed from step 40 of /x")
  assert capsys.readouterr().out == "resumed from step 40 of /x\n"


def test_completions_jsonl_and_tensorboard_text(tmp_path, monkeypatch):
  texts = []

  class FakeSummaryWriter:
    def __init__(self, *a, **k): pass
    def add_scalar(self, *a): pass
    def add_text(self, tag, text, step): texts.append((tag, text, step))
    def close(self): pass

  monkeypatch.setattr("tensorboardX.SummaryWriter", FakeSummaryWriter)
  records = [Record(id=f"r{i}", question="q?", answer="7") for i in range(3)]
  completions = [["a </think> 7", "b </think> 8"], ["</think> 7"] * 2, ["x"] * 2]
  rows = eval_lib.completion_rows(records, completions, reward_name="exact_match", max_prompts=2)
  assert [(r["id"], r["sample"], r["answer"], r["reward"]) for r in rows] == [
      ("r0", 0, "7", 1.0), ("r0", 1, "8", 0.0), ("r1", 0, "7", 1.0), ("r1", 1, "7", 1.0)]
  writer = MetricWriter(str(tmp_path), progress_bar="off")
  writer.completions(10, "eval", rows)
  writer.completions(20, "eval", rows[:1])
  writer.close()
  saved = read_metrics(str(tmp_path / "completions.jsonl"))
  assert [(r["step"], r["split"], r["id"]) for r in saved] == [(10, "eval", "r0")] * 2 + [(10, "eval", "r1")] * 2 + \
      [(20, "eval", "r0")]
  assert texts[0][0] == "eval/completions" and texts[0][2] == 10
  assert texts[0][1].splitlines()[0] == "| id | sample | completion | answer | reward | gold |"
  # A resumed run keeps the rows through its checkpoint step only, as metrics.jsonl does.
  MetricWriter(str(tmp_path), tensorboard=False, progress_bar="off", keep_through_step=10).close()
  assert {r["step"] for r in read_metrics(str(tmp_path / "completions.jsonl"))} == {10}


def test_wandb_backend_behind_the_writer_interface(tmp_path, monkeypatch):
  runs = []

  class FakeRun:
    def __init__(self, **kwargs):
      self.init, self.logged, self.finished = kwargs, [], False
      runs.append(self)
    def log(self, data, step): self.logged.append((step, data))
    def finish(self): self.finished = True

  fake = types.SimpleNamespace(init=lambda **k: FakeRun(**k), util=types.SimpleNamespace(generate_id=lambda: "abc123"),
                               Table=lambda columns, data: ("table", columns, data))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = TrainConfig(name="run1", report_to="wandb")
  for _ in range(2):  # the second writer (a resume) continues the same W&B run
    writer = MetricWriter(str(tmp_path), tensorboard=False, progress_bar="off", report_to=cfg.report_to,
                          run_name=cfg.name, config=cfg.to_dict())
    writer.write(3, {"reward/mean": 0.5, "loss": 1.0})
    writer.completions(3, "eval", [{"id": "r0", "completion": "c", "reward": 1.0}])
    writer.close()
  assert [r.init["id"] for r in runs] == ["abc123", "abc123"] and runs[0].init["resume"] == "allow"
  assert runs[0].init["name"] == "run1" and runs[0].init["config"]["report_to"] == "wandb"
  assert runs[0].logged[0] == (3, {"loss": 1.0, "reward": 0.5})
  assert runs[0].logged[1] == (3, {"eval/completions": ("table", ["id", "completion", "reward"], [["r0", "c", 1.0]])})
  assert all(r.finished for r in runs)


def test_report_to_is_validated_and_wandb_must_be_installed(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="report_to='mlflow'"):
    TrainConfig(report_to="mlflow")
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  with pytest.raises(ConfigError, match="pip install wandb"):
    MetricWriter(str(tmp_path), tensorboard=False, progress_bar="off", report_to="tensorboard,wandb")


def test_readme_lists_every_renamed_metric():
  import pathlib
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  for ours, trl in writers.LOGGED_NAMES.items():
    assert re.search(rf"\| `{re.escape(trl)}` \| `{re.escape(ours)}` \|", readme), (ours, trl)


def test_console_log_off_keeps_the_files_and_notes(tmp_path, capsys):
  writer = MetricWriter(str(tmp_path), tensorboard=False, progress_bar="off", total_steps=200, console_log=False)
  writer.write(20, TRAIN)
  writer.note("resumed from step 20 of /x")
  writer.close()
  assert capsys.readouterr().out == "resumed from step 20 of /x\n"  # no per-row line, the notes stay
  assert read_metrics(str(tmp_path / "metrics.jsonl"))[0]["step"] == 20
