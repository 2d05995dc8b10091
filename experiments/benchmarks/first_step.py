"""Where the first step's time goes: a timeline of the benchmark's GRPO step 0 in fresh processes (issue 17).

  python -m experiments.benchmarks.first_step --workload DIR [--forms unrolled scan] [--runs 3] [--out OUT]

Step 0 runs as `ours_grpo.run_train` and the trainer's first step run it: the update's lowering and compile start in a
background thread (what `tsallis_jax.train.compile_ahead` does, here inline so that each phase gets a timestamp), the
main thread traces, compiles and runs the rollout, scores the rewards on the host, waits for the compile, then runs the
first update. Step 1 follows (a second rollout and update, both compiled), so the first runs' one-time costs show
beside the warm ones. No persistent compilation cache: a user's first run. Each run is a fresh process (`--child`),
the forms alternate (`--forms unrolled scan`: the default model and `ModelConfig.scan_layers`).

Events, in seconds from the start of step 0: `update_lowered` (trace + lowering of the update, in the thread),
`rollout_done` (the rollout's trace, compile and first run), `reward_done`, `update_compiled`, `update_done` (= the
first step); plus `built_s` (weights loaded and the train state made, before step 0), `rollout_warm_s` and
`update_warm_s` (step 1's phases). Writes OUT.json (every run) and OUT.md (medians per form).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
EVENTS = ("update_lowered", "rollout_done", "reward_done", "update_compiled", "update_done")
FORMS = {"unrolled": [], "scan": ["--scan-layers"]}


def timeline(folder: str, scan_layers: bool = False) -> dict:
  """Runs steps 0 and 1 of the benchmark's GRPO step in this process; returns the events (see the module docstring).
  Call it in a fresh process for a cold first step."""
  t_start = time.perf_counter()
  import threading

  import jax
  import jax.numpy as jnp

  from experiments.benchmarks import ours_grpo, workloads
  from experiments.benchmarks.peers import common
  from tsallis_jax.data.records import Record
  from tsallis_jax.train import scoring

  built = ours_grpo.build(folder, "grpo", scan_layers=scan_layers)
  built_s = time.perf_counter() - t_start
  spec, mesh, state = built.spec, built.mesh, built.state
  B = spec.num_prompts
  reward_funcs = scoring.RewardFuncs((lambda completions, records, **_: common.reward_contains(
      spec.reward_token, completions),), (1.0,))
  records = [Record(id=f"bench-{i}", question=text, answer="", source=folder, index=i)
             for i, text in enumerate(workloads.read_prompts(folder)[0][:B])]
  q_range = jnp.asarray([built.cfg.q, built.cfg.q], jnp.float32)
  key = jax.random.key(0)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
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
      args = jax.tree.map(abstract, (state, built.abstract_batch, step_key, q_range))
      thread = threading.Thread(target=compile_update, args=(args,), daemon=True)
      thread.start()
    rollout = jax.block_until_ready(built.rollout_fn(state.params, *built.prompts, rollout_key))
    t1 = time.perf_counter()
    rewards_BxG = jax.block_until_ready(scoring.rollout_rewards(reward_funcs, rollout, records, built.tokenizer,
                                                                mesh, B))
    t2 = time.perf_counter()
    if step == 0:
      events["rollout_done"], events["reward_done"] = t1 - t0, t2 - t0
      thread.join()
      if "error" in compiled:
        raise compiled["error"]
    state, _ = compiled["update"](state, {"rollout": rollout, **built.answers, "rewards_BxG": rewards_BxG},
                                  step_key, q_range)
    jax.block_until_ready(state.params)
    t3 = time.perf_counter()
    if step == 0:
      events["update_done"] = t3 - t0
    else:
      phases = {"rollout_warm_s": t1 - t0, "update_warm_s": t3 - t2}
  return {"scan_layers": scan_layers, "built_s": built_s, **{e: events[e] for e in EVENTS}, **phases}


def summary(runs: list[dict]) -> dict[str, dict[str, float]]:
  """Per form: the median of each event over its runs."""
  out = {}
  for form in FORMS:
    rs = [r for r in runs if r["form"] == form]
    if rs:
      keys = ("built_s", *EVENTS, "rollout_warm_s", "update_warm_s")
      out[form] = {k: statistics.median(r[k] for r in rs) for k in keys} | {"runs": len(rs)}
  return out


def write(out: pathlib.Path, runs: list[dict], command: str) -> None:
  from experiments.benchmarks import run as run_lib
  agg = summary(runs)
  m = run_lib.machine()
  flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
  isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
  lines = ["# The first step's timeline: the benchmark's GRPO step 0 in fresh processes", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
           f"{run_lib.git_commit()}; machine: {m['cpu']} ({isa}), {m['cores']} cores, {m['memory_gib']} GiB",
           f"- command: `{command}`", "- seconds from the start of step 0 (medians over runs); the update compiles in "
           "a background thread while the rollout compiles and runs; no persistent compilation cache", "",
           "| form | runs | update lowered | rollout done | update compiled | first step (update done) | first update "
           "run | warm update | warm rollout | load + state (before step 0) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for form, a in agg.items():
    lines.append(f"| {form} | {a['runs']} | {a['update_lowered']:.2f} | {a['rollout_done']:.2f} | "
                 f"{a['update_compiled']:.2f} | **{a['update_done']:.2f}** | "
                 f"{a['update_done'] - a['update_compiled']:.2f} | {a['update_warm_s']:.3f} | "
                 f"{a['rollout_warm_s']:.3f} | {a['built_s']:.2f} |")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  out.with_suffix(".json").write_text(json.dumps({"command": command, "summary": agg, "runs": runs}, indent=1))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True, help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=["unrolled", "scan"])
  p.add_argument("--runs", type=int, default=3, help="fresh processes per form")
  p.add_argument("--out", default=str(HERE / "results" / "first_step"), help="writes OUT.json and OUT.md")
  p.add_argument("--scan-layers", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    from tsallis_jax import host_memory
    host_memory.keep_freed_memory()  # as the command lines and ours_grpo.py: before JAX starts
    print("FIRST_STEP " + json.dumps(timeline(args.workload, args.scan_layers)), flush=True)
    return 0
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "3"}
  runs = []
  for r in range(args.runs):
    for form in args.forms:
      cmd = [sys.executable, "-m", "experiments.benchmarks.first_step", "--child", "--workload", args.workload,
             *FORMS[form]]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
      line = next((s for s in proc.stdout.splitlines() if s.startswith("FIRST_STEP ")), None)
      if proc.returncode or line is None:
        raise RuntimeError(f"first_step child failed ({form}, run {r}, exit {proc.returncode}): {proc.stderr[-2000:]}")
      runs.append({"form": form, "run": r, **json.loads(line[len("FIRST_STEP "):])})
      print(f"run {r} {form}: first step {runs[-1]['update_done']:.2f} s", flush=True)
  command = "python -m experiments.benchmarks.first_step " + " ".join(argv if argv is not None else sys.argv[1:])
  write(pathlib.Path(args.out), runs, command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
