"""Runs one benchmark command in its own process and records what the machine did meanwhile.

The 2-core machines here are shared, and a foreign busy process wrecks multi-threaded timings (torch with 2 OpenMP
threads slows 5-10x). So every run records (after ../shared/bench/run_bench.py):

  foreign_cores   average cores used by OTHER processes during the run: busy time from /proc/stat minus this
                  run's own CPU time (user + sys of the child), divided by the wall time
  own_cores       this run's CPU time / wall time
  peak_rss_mb     the child's maximum resident set size (from wait4's rusage)

and parses the runner's single `BENCH_RESULT {json}` line (see `peers/common.py`).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Mapping, Sequence

from experiments.benchmarks.peers.common import RESULT_PREFIX


def busy_seconds(stat_path: str = "/proc/stat") -> float:
  """CPU-seconds all processes have spent busy since boot (user..steal, without idle and iowait)."""
  with open(stat_path) as f:
    fields = [int(x) for x in f.readline().split()[1:9]]
  idle = fields[3] + fields[4]
  return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def parse_result(text: str) -> dict[str, Any] | None:
  """The last BENCH_RESULT line's JSON in a runner's output, or None when the runner printed none."""
  found = None
  for line in text.splitlines():
    if line.startswith(RESULT_PREFIX):
      try:
        found = json.loads(line[len(RESULT_PREFIX):])
      except json.JSONDecodeError as err:
        raise ValueError(f"Malformed {RESULT_PREFIX.strip()} line ({err}): {line[:200]!r}") from err
  return found


def run(cmd: Sequence[str], log_path: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
        timeout_s: float = 1800.0) -> dict[str, Any]:
  """Runs `cmd` with stdout+stderr to `log_path`; returns the parsed result plus rc, wall, load and peak RSS.

  A run that fails, times out or prints no result still returns a dict (with `ok` False and the log's tail), so one
  broken system never stops the whole benchmark.
  """
  os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
  full_env = dict(os.environ)
  full_env.update(env or {})
  busy0, t0 = busy_seconds(), time.time()
  with open(log_path, "w") as log:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
    deadline = t0 + timeout_s
    status, usage, timed_out = None, None, False
    while status is None:
      pid, status_now, usage_now = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        status, usage = status_now, usage_now
        break
      if time.time() > deadline:
        proc.kill()
        timed_out = True
        _, status, usage = os.wait4(proc.pid, 0)
        break
      time.sleep(0.05)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.time() - t0
  own = usage.ru_utime + usage.ru_stime
  foreign = max(0.0, (busy_seconds() - busy0) - own)
  with open(log_path) as f:
    text = f.read()
  result = parse_result(text) or {}
  result.update({
    "ok": proc.returncode == 0 and bool(result) and not timed_out, "rc": proc.returncode, "timed_out": timed_out,
    "wall_s": round(wall, 2), "own_cores": round(own / wall, 2), "foreign_cores": round(foreign / wall, 2),
    "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": log_path,
  })
  if not result["ok"]:
    result["log_tail"] = text[-2000:]
  return result
