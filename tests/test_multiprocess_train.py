"""Two processes on one machine (jax.distributed, coordinator on 127.0.0.1, gloo CPU collectives, 2 devices each) run
real training steps of `python -m experiments.train` and agree with a single-process run over 4 devices: the code
path of a TPU pod (per-host data rows, global arrays, sharded checkpoints, metrics from process 0)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["num_steps=3", "eval_every=3", "checkpoint_every=3"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, extra_env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for k in ("TSALLIS_COORDINATOR", "TSALLIS_NUM_PROCESSES", "TSALLIS_PROCESS_ID"):
    env.pop(k, None)
  env.update(extra_env or {})
  cmd = [sys.executable, "-m", "experiments.train", "--config", "smoke", "--workdir", str(workdir)]
  for o in OVERRIDES:
    cmd += ["--set", o]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in f]


def test_two_processes_agree_with_one_process(tmp_path):
  port = _free_port()
  multi = tmp_path / "two_processes"
  procs = [_launch(multi, 2, {"TSALLIS_COORDINATOR": f"127.0.0.1:{port}", "TSALLIS_NUM_PROCESSES": "2",
                              "TSALLIS_PROCESS_ID": str(i)}) for i in range(2)]
  single = _launch(tmp_path / "one_process", 4)
  for p in procs + [single]:
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err.decode()[-4000:]
  multi_rows, single_rows = _rows(multi), _rows(tmp_path / "one_process")
  assert [r["step"] for r in multi_rows] == [r["step"] for r in single_rows]
  assert [r["step"] for r in multi_rows if "loss" in r] == [1, 2, 3]
  for a, b in zip(multi_rows, single_rows):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"step {a['step']} {k}")
  # Every process wrote its shards of the same checkpoint; only process 0 wrote metrics and results.
  assert (multi / "checkpoints" / "3").is_dir() and (multi / "results.json").is_file()
