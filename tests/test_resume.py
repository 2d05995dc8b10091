"""A run killed with SIGKILL mid-way resumes where it stopped, and its metrics equal the uninterrupted run's.

Both runs are real `python -m experiments.train` processes (the same entry point a pod runs) on the smoke config
with a checkpoint every step; the killed one is stopped with `kill -9` after it has written checkpoint `KILL_AFTER`,
then started again with the same command. Everything but wall-clock timings must match bit for bit on CPU (same XLA
programs, same keys, same data position).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
KILL_AFTER = 3
OVERRIDES = [f"num_steps={STEPS}", "checkpoint_every=1", "eval_every=4", "max_to_keep=2"]


def _command(workdir):
  cmd = [sys.executable, "-m", "experiments.train", "--config", "smoke", "--workdir", str(workdir)]
  for o in OVERRIDES:
    cmd += ["--set", o]
  return cmd


def _env(devices=8):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
  reference = subprocess.Popen(_command(ref_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
  victim = subprocess.Popen(_command(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
  marker = run_dir / "checkpoints" / str(KILL_AFTER)
  deadline = time.time() + 600
  while not marker.is_dir():
    assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
    assert time.time() < deadline, "the run never wrote its checkpoint"
    time.sleep(0.02)
  os.kill(victim.pid, signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL
  assert not (run_dir / "results.json").exists(), "the run finished before the kill; the test proves nothing"
  killed_at = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_at < STEPS

  resumed = subprocess.run(_command(run_dir), cwd=ROOT, env=_env(), capture_output=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-3000:]

  ref_rows, run_rows = _rows(ref_dir), _rows(run_dir)
  assert [r["step"] for r in ref_rows if "loss" in r] == list(range(1, STEPS + 1))
  assert run_rows == ref_rows  # every metric of every step (and the eval rows), bit for bit
  with open(ref_dir / "results.json") as f, open(run_dir / "results.json") as g:
    assert json.load(f) == json.load(g)
