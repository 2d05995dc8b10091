"""Workdir paths: object-store URIs (gs://) stay URIs, local paths become absolute; the metrics writer's rewrite mode
(used for object stores, which cannot append) writes the same file as its local append mode, also after a resume.
"""
import os

import numpy as np
import pytest

from tsallis_jax.train import writers
from tsallis_jax.train.checkpoint import is_remote, resolve_workdir
from tsallis_jax.train.writers import MetricWriter, read_metrics


@pytest.mark.parametrize("uri", ["gs://bucket/run", "gs://bucket/run/sub", "s3://bucket/run"])
def test_resolve_workdir_keeps_uris(uri):
  path = resolve_workdir(uri)
  assert str(path) == uri and os.fspath(path) == uri
  assert str(path / "metrics.jsonl") == uri + "/metrics.jsonl"
  assert is_remote(uri) and is_remote(path)


def test_resolve_workdir_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = resolve_workdir("runs/a")
  assert str(path) == os.path.join(str(tmp_path), "runs", "a") and path.is_absolute()
  assert str(resolve_workdir(str(tmp_path / "b"))) == str(tmp_path / "b")
  assert not is_remote("runs/a") and not is_remote(str(tmp_path)) and not is_remote("gs:/bucket/run")


def _run(workdir, rewrite, steps, keep_through_step=-1, start_step=0):
  writer = MetricWriter(str(workdir), tensorboard=False, progress_bar="off", start_step=start_step,
                        keep_through_step=keep_through_step, rewrite=rewrite)
  for step in steps:
    writer.write(step, {"loss": np.float32(0.5 / (step + 1)), "gen/tokens": np.int32(step * 7), "note": "x"})
  writer.close()


def _read(workdir):
  with open(os.path.join(str(workdir), "metrics.jsonl"), encoding="utf-8") as f:
    return f.read()


def test_rewrite_mode_writes_the_same_file_as_append_mode(tmp_path):
  for rewrite in (False, True):
    _run(tmp_path / str(rewrite), rewrite, range(1, 6))
  assert _read(tmp_path / "False") == _read(tmp_path / "True")
  assert [r["step"] for r in read_metrics(str(tmp_path / "True" / "metrics.jsonl"))] == [1, 2, 3, 4, 5]


def test_rewrite_mode_matches_append_mode_after_resume_truncation(tmp_path):
  """A run killed after step 5 (and mid-write) resumes from step 3 in both modes; the files stay equal."""
  for rewrite in (False, True):
    workdir = tmp_path / str(rewrite)
    _run(workdir, rewrite, range(1, 6))
    with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write('{"step": 6, "lo')  # a row cut by the kill
    _run(workdir, rewrite, [], keep_through_step=3, start_step=3)  # truncation alone, no new row
    assert [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl"))] == [1, 2, 3]
    _run(workdir, rewrite, range(4, 8), keep_through_step=3, start_step=3)
  assert _read(tmp_path / "False") == _read(tmp_path / "True")
  assert [r["step"] for r in read_metrics(str(tmp_path / "True" / "metrics.jsonl"))] == list(range(1, 8))


def test_remote_workdir_selects_rewrite_mode(tmp_path, monkeypatch):
  """The default mode follows `is_remote(workdir)`: append for a local folder, rewrite for a URI (forced here)."""
  local = MetricWriter(str(tmp_path / "a"), tensorboard=False, progress_bar="off")
  assert not local.rewrite and local._file is not None
  local.close()
  monkeypatch.setattr(writers, "is_remote", lambda path: True)
  writer = MetricWriter(str(tmp_path / "b"), tensorboard=False, progress_bar="off")
  assert writer.rewrite and writer._file is None
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert read_metrics(str(tmp_path / "b" / "metrics.jsonl")) == [{"step": 1, "loss": 1.0}]
