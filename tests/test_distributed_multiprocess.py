"""tsallis_jax.distributed with two real processes on 127.0.0.1 (two fake hosts, 2 CPU devices each).

The test runs this file as a script twice (process ids 0 and 1); each worker joins the job through the
TSALLIS_* variables, builds the global mesh, reads only its own rows of a global batch, assembles the global
arrays and reduces them in one jitted computation. Both must see the global answer computed here in numpy.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

GLOBAL_BATCH = 8
_TIMEOUT_S = 90


def _global_batch() -> np.ndarray:
  return np.arange(GLOBAL_BATCH * 3, dtype=np.float32).reshape(GLOBAL_BATCH, 3) ** 2


def _worker() -> None:
  from tsallis_jax import distributed

  info = distributed.maybe_initialize()  # reads TSALLIS_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec

  results = {"method": info.method, "process_index": jax.process_index(), "process_count": jax.process_count(),
             "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
             "is_main": distributed.is_main_process()}
  for axis_sizes in ({"data": -1}, {"data": -1, "model": 2}):
    mesh = distributed.make_mesh(axis_sizes)
    rows = distributed.host_batch_slice(GLOBAL_BATCH, mesh, "data")
    local_BxT = _global_batch()[rows]
    batch = distributed.global_batch_from_local({"x_BxT": local_BxT}, mesh, PartitionSpec("data"),
                                                global_batch_size=GLOBAL_BATCH)
    weights_T = jnp.array([1.0, -2.0, 3.0])
    total = jax.jit(lambda b: jnp.sum(b["x_BxT"] * weights_T))(batch)
    gathered = multihost_utils.process_allgather(batch["x_BxT"], tiled=True)
    key = "x".join(str(v) for v in mesh.shape.values())
    results[key] = {"rows": [rows.start, rows.stop], "total": float(total),
                    "global_equal": bool(np.array_equal(np.asarray(gathered), _global_batch()))}
  print("RESULT " + json.dumps(results), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_form_one_job_and_agree():
  port = _free_port()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               TSALLIS_COORDINATOR=f"127.0.0.1:{port}", TSALLIS_NUM_PROCESSES="2", TSALLIS_PROCESS_ID=str(pid),
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, cwd=repo,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=_TIMEOUT_S)
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out in outs]

  expected_total = float(np.sum(_global_batch() * np.array([1.0, -2.0, 3.0], np.float32)))
  for pid, r in enumerate(results):
    assert (r["method"], r["process_index"], r["process_count"]) == ("explicit", pid, 2)
    assert (r["device_count"], r["local_device_count"]) == (4, 2)
    assert r["is_main"] == (pid == 0)
    for key in ("4", "2x2"):
      np.testing.assert_allclose(r[key]["total"], expected_total, rtol=1e-6)
      assert r[key]["global_equal"]
  # With the batch over all 4 devices, each host reads a disjoint half of the rows, together all of them.
  halves = sorted(tuple(r["4"]["rows"]) for r in results)
  assert halves == [(0, 4), (4, 8)]


if __name__ == "__main__":
  _worker()
