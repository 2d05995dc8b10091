"""launch/host.sh: its dry run, its argument checks, and a real two-host training job on 127.0.0.1.

The two-host test runs the host script twice (process ids 0 and 1, 2 fake CPU devices each), exactly as every TPU
worker runs it, so the job goes through `python -m experiments.train`, `tsallis_jax.distributed.maybe_initialize`,
the global mesh over 4 devices and a multi-process orbax checkpoint.
"""
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = os.path.join(REPO, "launch", "host.sh")
CONFIG = "smoke"  # experiments/configs/smoke.py: tiny model, synthetic task


def _host(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", HOST, *args], capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})}, cwd=REPO)


def _printed(out: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _fake_venv(path) -> None:
  (path / "bin").mkdir(parents=True)
  (path / "bin" / "python").symlink_to(sys.executable)


def test_dry_run_sets_up_a_fresh_venv_then_trains(tmp_path):
  venv = tmp_path / "venv"
  result = _host("--dry-run", "--accelerator", "tpu", "--multihost", "auto", "--venv", str(venv), "--config", CONFIG,
                 "--workdir", "gs://my-bucket/run", "--", "--set", "q=0.5")
  assert result.returncode == 0, result.stderr
  cmds = _printed(result.stdout)
  assert any(c[1:3] == ["-m", "venv"] and c[3] == str(venv) for c in cmds)
  (install,) = [c for c in cmds if "-r" in c]
  jax_pin = next(line for line in open(os.path.join(REPO, "requirements.txt")) if line.startswith("jax=="))
  assert install[0] == f"{venv}/bin/python" and f"jax[tpu]=={jax_pin.strip()[5:]}" in install
  assert {"requirements.txt", "launch/requirements-cloud.txt"} <= set(install)
  assert any(c[-3:] == ["--no-deps", "-e", "."] for c in cmds)
  train = cmds[-1]
  assert train[:2] == ["env", "TSALLIS_DISTRIBUTED=auto"]
  assert train[2:] == [f"{venv}/bin/python", "-m", "experiments.train", "--config", CONFIG, "--workdir",
                       "gs://my-bucket/run", "--set", "q=0.5"]
  assert not venv.exists()  # a dry run creates nothing


def test_rerun_with_an_up_to_date_venv_skips_the_install(tmp_path):
  venv = tmp_path / "venv"
  _fake_venv(venv)
  stamp = _host("--print-stamp", "--accelerator", "gpu")
  assert stamp.returncode == 0 and len(stamp.stdout.strip()) == 64
  (venv / ".tsallis_install_stamp").write_text(stamp.stdout)
  args = ["--dry-run", "--venv", str(venv), "--config", CONFIG, "--workdir", str(tmp_path / "run")]
  result = _host(*args, "--accelerator", "gpu", "--coordinator", "10.0.0.2:8476", "--num-processes", "2",
                 "--process-id", "1")
  assert result.returncode == 0, result.stderr
  cmds = _printed(result.stdout)
  assert len(cmds) == 1 and "up to date" in result.stdout
  assert cmds[0][1:4] == ["TSALLIS_COORDINATOR=10.0.0.2:8476", "TSALLIS_NUM_PROCESSES=2", "TSALLIS_PROCESS_ID=1"]
  # Another accelerator needs another jax wheel: the stamp no longer matches, so the install runs again.
  other = _host(*args, "--accelerator", "tpu")
  assert any("jax[tpu]" in " ".join(c) for c in _printed(other.stdout))


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/tmp/x"], "--config NAME is required"),
    (["--config", CONFIG], "--workdir DIR is required"),
    (["--config", "no_such_config", "--workdir", "/tmp/x"], "no config experiments/configs/no_such_config.py"),
    (["--config", CONFIG, "--workdir", "/tmp/x", "--accelerator", "v4-8"], "not one of tpu, gpu, cpu, auto"),
    (["--config", CONFIG, "--workdir", "/tmp/x", "--coordinator", "h:1"], "go together"),
    (["--config", CONFIG, "--workdir", "/tmp/x", "--coordinator", "h", "--num-processes", "2", "--process-id", "0"],
     "HOST:PORT"),
    (["--config", CONFIG, "--workdir", "/tmp/x", "--coordinator", "h:1", "--num-processes", "2", "--process-id",
      "2"], "must be < --num-processes 2"),
    (["--config", CONFIG, "--workdir", "/tmp/x", "--multihost", "yes"], "only 'auto'"),
    (["--config", CONFIG, "--workdir", "/tmp/x", "--q", "0.5"], "unknown option '--q'"),
])
def test_bad_arguments_fail_before_anything_runs(tmp_path, args, message):
  venv, log = tmp_path / "venv", tmp_path / "logs" / "host.log"
  result = _host("--venv", str(venv), "--log", str(log), *args)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert message in result.stderr
  assert not venv.exists() and not log.exists() and "+ " not in result.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_hosts(tmp_path, workdir, *train_args: str) -> list[str]:
  """Runs the host script as processes 0 and 1 of one job on 127.0.0.1; returns their outputs."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  venv = os.path.dirname(os.path.dirname(sys.executable))
  procs = [subprocess.Popen(
      ["bash", HOST, "--accelerator", "cpu", "--venv", venv, "--skip-install", "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", str(pid), "--log", str(tmp_path / f"host{pid}.log"),
       "--config", CONFIG, "--workdir", str(workdir), "--", *train_args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


_SHORT = ("--set", "checkpoint_every=1", "--set", "eval_every=0", "--set", "tensorboard=false")


def _train_rows(workdir) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "loss" in r]


def test_two_fake_hosts_run_one_training_job(tmp_path):
  """Both processes finish; process 0 alone writes metrics; both wrote their shards of every checkpoint."""
  workdir = tmp_path / "run"
  outs = _two_hosts(tmp_path, workdir, "--set", "num_steps=2", *_SHORT)
  for pid, out in enumerate(outs):
    assert f"TSALLIS_PROCESS_ID={pid}" in out and "TSALLIS_NUM_PROCESSES=2" in out
  # Only process 0 prints the results (and logs at INFO); process 1 prints no results.
  assert '"test/p@1"' in outs[0] and '"test/p@1"' not in outs[1]
  assert json.loads((workdir / "results.json").read_text())["steps"] == 2
  # One writer: every step appears exactly once in metrics.jsonl (two writers would append each step twice).
  assert [r["step"] for r in _train_rows(workdir)] == [1, 2]
  # Both processes took part in every checkpoint: each wrote its own shards at the same steps.
  steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
  assert steps == [1, 2]
  for step in steps:
    state = workdir / "checkpoints" / str(step) / "state"
    assert (state / "commit_success.txt").exists()
    assert {d.name for d in state.iterdir() if d.name.startswith("ocdbt.process_")} == {
        "ocdbt.process_0", "ocdbt.process_1"}


@pytest.mark.slow
def test_two_fake_hosts_resume_when_the_same_command_runs_again(tmp_path):
  """After a stop at step 1, the same two-host command continues from the shared workdir instead of restarting.

  The second run uses another learning rate: a restart would rewrite step 1's row with it, a resume keeps it.
  """
  workdir = tmp_path / "run"
  _two_hosts(tmp_path, workdir, "--set", "num_steps=1", "--set", "learning_rate=0.001", *_SHORT)
  first = _train_rows(workdir)
  _two_hosts(tmp_path, workdir, "--set", "num_steps=2", "--set", "learning_rate=0.002", *_SHORT)
  rows = _train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0] == first[0]
  assert rows[1]["learning_rate"] == pytest.approx(0.002)


_FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for `python -m experiments.train`: waits; on SIGTERM (a preemption notice) "saves" and exits 75.
trap 'echo "trainer: SIGTERM, checkpoint saved"; exit 75' TERM
echo "trainer: running"
while true; do sleep 0.1; done
"""


def test_sigterm_reaches_the_trainer_and_exit_75_is_reported(tmp_path):
  """A SIGTERM to host.sh (the VM's shutdown, or a scheduler) is forwarded to the trainer at once, and the script
  exits with the trainer's 75, "run the same command again"."""
  import signal
  import time
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(_FAKE_TRAINER)
  (venv / "bin" / "python").chmod(0o755)
  log = tmp_path / "host.log"
  proc = subprocess.Popen(["bash", HOST, "--skip-install", "--venv", str(venv), "--accelerator", "cpu", "--log",
                           str(log), "--config", CONFIG, "--workdir", str(tmp_path / "run")], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 60
  while "trainer: running" not in (log.read_text() if log.exists() else ""):
    assert proc.poll() is None and time.time() < deadline, log.read_text() if log.exists() else ""
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 75, out
  assert "trainer: SIGTERM, checkpoint saved" in out and "run the same command again to resume" in out


# --- --sync-workdir: a local mirror of the gs:// workdir --------------------------------------------------------------

_FAKE_GCLOUD_STORAGE = """#!{python}
# `gcloud storage ls|rsync` over a folder standing in for GCS: gs://BUCKET/PATH -> $FAKE_GCS/BUCKET/PATH.
import os, shutil, sys
args = [a for a in sys.argv[1:] if not a.startswith("--")]
local = lambda p: os.path.join(os.environ["FAKE_GCS"], p[5:]) if p.startswith("gs://") else p
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(" ".join(sys.argv[1:]) + "\\n")
if args[:2] == ["storage", "ls"]:
  if not os.path.exists(local(args[2])):
    sys.exit("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
elif args[:2] == ["storage", "rsync"]:
  shutil.copytree(local(args[2]), local(args[3]), dirs_exist_ok=True)
else:
  sys.exit("fake gcloud: unexpected " + " ".join(sys.argv[1:]))
"""


def test_sync_workdir_dry_run(tmp_path):
  mirror = tmp_path / "mirror"
  result = _host("--dry-run", "--skip-install", "--sync-workdir", "--mirror", str(mirror), "--config", CONFIG,
                 "--workdir", "gs://my-bucket/run")
  assert result.returncode == 0, result.stderr
  cmds = _printed(result.stdout)
  train = next(c for c in cmds if "experiments.train" in c)
  assert train[train.index("--workdir") + 1] == str(mirror)
  rsyncs = [c for c in cmds if c[:3] == ["gcloud", "storage", "rsync"]]
  assert [c[-2:] for c in rsyncs] == [["gs://my-bucket/run", str(mirror)], [str(mirror), "gs://my-bucket/run"]]
  assert cmds.index(rsyncs[0]) < cmds.index(train) < cmds.index(rsyncs[1])  # download, train, upload
  assert not any("--delete-unmatched-destination-objects" in c for c in rsyncs)


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/tmp/run"], "is local already"),
    (["--workdir", "gs://b/run", "--multihost", "auto"], "one host only"),
    (["--workdir", "gs://b/run", "--sync-every", "soon"], "whole number"),
])
def test_sync_workdir_bad_arguments(tmp_path, args, message):
  result = _host("--sync-workdir", "--skip-install", "--venv", str(tmp_path / "venv"), "--config", CONFIG, *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_sync_workdir_restores_from_and_uploads_to_the_bucket(tmp_path):
  gcs, mirror = tmp_path / "gcs", tmp_path / "mirror"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD_STORAGE.format(python=sys.executable))
  (bin_dir / "gcloud").chmod(0o755)
  (gcs / "my-bucket" / "run" / "checkpoints" / "3").mkdir(parents=True)  # a previous, preempted run
  (gcs / "my-bucket" / "run" / "checkpoints" / "3" / "state").write_text("step 3")
  mirror.mkdir()
  (mirror / "metrics.jsonl").write_text('{"step": 4}\n')  # stands in for what this run writes locally
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCS": str(gcs),
         "FAKE_GCLOUD_LOG": str(tmp_path / "calls.txt"), "JAX_PLATFORMS": "cpu"}
  # --print-config goes through the real entry point (and its config loading) but trains nothing.
  result = _host("--skip-install", "--venv", os.path.dirname(os.path.dirname(sys.executable)), "--accelerator",
                 "cpu", "--log", str(tmp_path / "host.log"), "--sync-workdir", "--mirror", str(mirror),
                 "--config", CONFIG, "--workdir", "gs://my-bucket/run", "--", "--print-config", env=env, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])["name"] == CONFIG
  assert (mirror / "checkpoints" / "3" / "state").read_text() == "step 3"  # downloaded before training
  assert (gcs / "my-bucket" / "run" / "metrics.jsonl").read_text() == '{"step": 4}\n'  # uploaded at exit
  calls = (tmp_path / "calls.txt").read_text().splitlines()
  assert [c.split()[1] for c in calls] == ["ls", "rsync", "rsync"]


def test_sync_workdir_refuses_an_unreadable_bucket(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f"#!{sys.executable}\nimport sys\nsys.exit('ERROR: 403 permission denied')\n")
  (bin_dir / "gcloud").chmod(0o755)
  result = _host("--skip-install", "--venv", os.path.dirname(os.path.dirname(sys.executable)), "--accelerator",
                 "cpu", "--log", str(tmp_path / "host.log"), "--sync-workdir", "--mirror", str(tmp_path / "m"),
                 "--config", CONFIG, "--workdir", "gs://my-bucket/run", env={
                     "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert result.returncode == 2 and "cannot read gs://my-bucket/run" in result.stdout + result.stderr
  assert "experiments.train" not in result.stdout  # no fresh run over a bucket we could not read


def test_fetch_copies_inputs_then_points_the_config_at_them(tmp_path):
  result = _host("--dry-run", "--skip-install", "--config", CONFIG, "--workdir", "gs://my-bucket/run",
                 "--fetch", "data_dir=gs://my-bucket/data/finqa/", "--fetch", "model_path=gs://my-bucket/m/Qwen3-0.6B",
                 "--", "--set", "q=1.0", env={"HOME": str(tmp_path)})
  assert result.returncode == 0, result.stderr
  cmds = _printed(result.stdout)
  for key, src in [("data_dir", "gs://my-bucket/data/finqa"), ("model_path", "gs://my-bucket/m/Qwen3-0.6B")]:
    assert ["gcloud", "storage", "cp", "--recursive", "--no-clobber", src, f"{tmp_path}/tsallis_fetch/{key}/"] in cmds
  train = cmds[-1]
  sets = [train[i + 1] for i, a in enumerate(train) if a == "--set"]
  assert sets == [f"data_dir={tmp_path}/tsallis_fetch/data_dir/finqa",
                  f"model_path={tmp_path}/tsallis_fetch/model_path/Qwen3-0.6B", "q=1.0"]


@pytest.mark.parametrize("item, message", [
    ("data_dir=/data/finqa", "must be gs://BUCKET/PATH"),
    ("tokenizer=gs://b/t", "KEY one of data_dir, model_path, init_checkpoint"),
    ("gs://b/data", "KEY one of"),
])
def test_fetch_bad_arguments(tmp_path, item, message):
  result = _host("--venv", str(tmp_path / "venv"), "--config", CONFIG, "--workdir", "gs://b/run", "--fetch", item)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert not (tmp_path / "venv").exists()


def test_help_lists_every_option():
  result = _host("--help")
  assert result.returncode == 0
  documented = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.M))
  parsed = set(re.findall(r"^\s+(?:-h\|)?(--[a-z-]+)\)", open(HOST, encoding="utf-8").read(), re.M))
  assert len(parsed) > 10 and parsed - {"--help"} <= documented, parsed - documented
