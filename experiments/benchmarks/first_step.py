"""Where the first step's time goes: a timeline of the benchmark's GRPO step 0 in fresh processes (issue 17).

  python -m experiments.benchmarks.first_step --workload DIR [--forms unrolled scan] [--runs 3] [--out OUT]
                                             [--quiet-wait 45]

Step 0 runs as `ours_grpo.run_train` and the trainer's first step run it: the update's lowering and compile start in a
background thread (what `tsallis_jax.train.compile_ahead` does, here inline so that each phase gets a timestamp), the
main thread traces, compiles and runs the rollout, scores the rewards on the host, waits for the compile, then runs the
first update. Step 1 follows (a second rollout and update, both compiled), so the first runs' one-time costs show
beside step 1's. No persistent compilation cache (the children run with `JAX_ENABLE_COMPILATION_CACHE=false`): a
user's first run. Each run is a fresh process (`--child`, from the repository root), started once other processes
use under 0.25 cores (up to `--quiet-wait` seconds, as `run.py`; the load is recorded), the forms alternate
(`--forms unrolled scan`: the default model and `ModelConfig.scan_layers`; `scan_xla` and `scan_quick_compile`: the
scanned form under those `TrainConfig.cpu_emitters` choices, `tsallis_jax.xla_cpu`).

Events, in seconds from the start of step 0: `update_lowered` (trace + lowering of the update, in the thread),
`rollout_done` (the rollout's trace, compile and first run), `reward_done`, `update_compiled`, `update_done` (= the
first step). Derived per run: `first_update_s`, the first update's run alone (`update_done` minus the later of
`update_compiled` and `reward_done`). Plus `built_s` (from entering `timeline`, imports included, to the weights
loaded and the train state made) and step 1's phases, one sample each: `rollout_step1_s`, `update_step1_s`.
Writes OUT.json (every run) and OUT.md (per form, the median over runs of each of these).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
EVENTS = ("update_lowered", "rollout_done", "reward_done", "update_compiled", "update_done")
FORMS = {"unrolled": [], "scan": ["--scan-layers"],
         # the scanned form under the other `TrainConfig.cpu_emitters` choices (`tsallis_jax.xla_cpu`; "scan" is "auto")
         "scan_xla": ["--scan-layers", "--cpu-emitters", "xla"],
         "scan_quick_compile": ["--scan-layers", "--cpu-emitters", "quick_compile"]}
CHILD_TIMEOUT_S = 1800


def timeline(folder: str, scan_layers: bool = False, cpu_emitters: str = "auto") -> dict:
  """Runs steps 0 and 1 of the benchmark's GRPO step in this process; returns the events (see the module docstring).
  Call it in a fresh process for a cold first step."""
  t_start = time.perf_counter()
  import threading

  import jax
  import jax.numpy as jnp

  from experiments.benchmarks import ours_grpo
  from tsallis_jax.train import compile_ahead, scoring

  built = ours_grpo.build(folder, "grpo", scan_layers=scan_layers, cpu_emitters=cpu_emitters)
  built_s = time.perf_counter() - t_start
  spec, mesh, state = built.spec, built.mesh, built.state
  B = spec.num_prompts
  reward_funcs, records = ours_grpo.host_rewards(spec, folder)
  q_range = jnp.asarray([built.cfg.q, built.cfg.q], jnp.float32)
  key = jax.random.key(0)
  events: dict[str, float] = {}
  compiled: dict = {}

  def compile_update(args):
    try:
      with jax.set_mesh(mesh):
        lowered = built.train_step.jitted.lower(*args)
        events["update_lowered"] = time.perf_counter() - t0
        compiled["update"] = lowered.compile()
        events["update_compiled"] = time.perf_counter() - t0
    except BaseException as e:  # re-raised in the main thread
      compiled["error"] = e

  phases = {}
  for step in range(2):
    rollout_key, step_key = jax.random.split(jax.random.fold_in(key, step))
    t0 = time.perf_counter()
    if step == 0:
      args = jax.tree.map(compile_ahead.abstract, (state, built.abstract_batch, step_key, q_range))
      thread = threading.Thread(target=compile_update, args=(args,), daemon=True)
      thread.start()
    try:
      rollout = jax.block_until_ready(built.rollout_fn(state.params, *built.prompts, rollout_key))
      t1 = time.perf_counter()
      rewards_BxG = jax.block_until_ready(scoring.rollout_rewards(reward_funcs, rollout, records, built.tokenizer,
                                                                  mesh, B))
      t2 = time.perf_counter()
    finally:
      if step == 0:
        thread.join()  # step 0's t0 stays the thread's reference; an interpreter exiting mid-compile would abort
    if step == 0:
      events["rollout_done"], events["reward_done"] = t1 - t0, t2 - t0
      if "error" in compiled:
        raise compiled["error"]
    state, _ = compiled["update"](state, {"rollout": rollout, **built.answers, "rewards_BxG": rewards_BxG},
                                  step_key, q_range)
    jax.block_until_ready(state.params)
    t3 = time.perf_counter()
    if step == 0:
      events["update_done"] = t3 - t0
    else:
      phases = {"rollout_step1_s": t1 - t0, "update_step1_s": t3 - t2}
  first_update_s = events["update_done"] - max(events["update_compiled"], events["reward_done"])
  return {"scan_layers": scan_layers, "cpu_emitters": cpu_emitters, "built_s": built_s, **{e: events[e] for e in EVENTS},
          "first_update_s": first_update_s, **phases}


def summary(runs: list[dict]) -> dict[str, dict[str, float]]:
  """Per form: the median over its runs of each event and each derived time (never a difference of medians)."""
  out = {}
  for form in FORMS:
    rs = [r for r in runs if r["form"] == form]
    if rs:
      keys = ("built_s", *EVENTS, "first_update_s", "rollout_step1_s", "update_step1_s")
      out[form] = {k: statistics.median(r[k] for r in rs) for k in keys} | {"runs": len(rs)}
  return out


def write(out: pathlib.Path, runs: list[dict], command: str) -> None:
  from experiments.benchmarks import run as run_lib
  agg = summary(runs)
  m = run_lib.machine()
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "").split()
    isa = " (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else ""
  except OSError:  # not Linux
    isa = ""
  lines = ["# The first step's timeline: the benchmark's GRPO step 0 in fresh processes", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
           f"{run_lib.git_commit()}; machine: {m['cpu']}{isa}, {m['cores']} cores, {m['memory_gib']} GiB",
           f"- command: `{command}`", "- seconds from the start of step 0 (medians over runs); the update compiles in "
           "a background thread while the rollout compiles and runs; no persistent compilation cache",
           "- other processes' load (cores) before each run: " + ", ".join(
               f"{r['form']} " + ("-" if r.get("load_before") is None else f"{r['load_before']:.2f}") for r in runs),
           "",
           "| form | runs | update lowered | rollout done | update compiled | first step (update done) | first update "
           "run alone | update, step 1 | rollout, step 1 | imports + load + state (before step 0) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for form, a in agg.items():
    lines.append(f"| {form} | {a['runs']} | {a['update_lowered']:.2f} | {a['rollout_done']:.2f} | "
                 f"{a['update_compiled']:.2f} | **{a['update_done']:.2f}** | "
                 f"{a['first_update_s']:.2f} | {a['update_step1_s']:.3f} | "
                 f"{a['rollout_step1_s']:.3f} | {a['built_s']:.2f} |")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  out.with_suffix(".json").write_text(json.dumps({"command": command, "summary": agg, "runs": runs}, indent=1))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True, help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=["unrolled", "scan"])
  p.add_argument("--runs", type=int, default=3, help="fresh processes per form")
  p.add_argument("--out", default=str(HERE / "results" / "first_step"), help="writes OUT.json and OUT.md")
  p.add_argument("--quiet-wait", type=float, default=45.0,
                 help="max seconds to wait before each run for other processes to use under 0.25 cores")
  p.add_argument("--scan-layers", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--cpu-emitters", default="auto", help=argparse.SUPPRESS)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    from tsallis_jax import host_memory
    host_memory.keep_freed_memory()  # as the command lines and ours_grpo.py: before JAX starts
    print("FIRST_STEP " + json.dumps(timeline(args.workload, args.scan_layers, args.cpu_emitters)), flush=True)
    return 0
  from experiments.benchmarks import run as run_lib
  command = "python -m experiments.benchmarks.first_step " + " ".join(argv if argv is not None else sys.argv[1:])
  runs = []

  def save_partial():  # a failed child: keep the runs before it
    if runs:
      write(pathlib.Path(args.out), runs, command + "  (stopped early: a run failed)")

  for r in range(args.runs):
    for form in args.forms:
      cmd = [sys.executable, "-m", "experiments.benchmarks.first_step", "--child", "--workload", args.workload,
             *FORMS[form]]
      result, load = run_lib.quiet_child_json(
          cmd, "FIRST_STEP", CHILD_TIMEOUT_S, args.quiet_wait,
          failed=f"first_step child failed ({form}, run {r}; the runs before it are in {args.out}.json)",
          save_partial=save_partial)
      runs.append({"form": form, "run": r, "load_before": load, **result})
      print(f"run {r} {form}: first step {runs[-1]['update_done']:.2f} s (other processes before it: "
            f"{'not measured' if load is None else f'{load:.2f} cores'})", flush=True)
  write(pathlib.Path(args.out), runs, command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
