"""Each program alone under each XLA:CPU emitter: compile time and warm run time (issue 17, `tsallis_jax.xla_cpu`).

  python -m experiments.benchmarks.program_emitters --workload DIR [--forms unrolled scan] [--rounds 2] [--out OUT]
                                                    [--quiet-wait 45]

The benchmark's two programs, the rollout (`generate_impl`, jitted as `ours_grpo.build` does) and the GRPO train
step (`make_train_step`), compiled ahead of time (`jax.stages.Lowered.compile`) once with XLA's default emitters and
once with `xla_cpu.OLDER_EMITTERS`, one after the other in the same process, then run 4 times each (the first call
apart; `run_s` = the median of calls 2-4). The step runs on a real batch: the rollout's samples and their host
rewards. Each (form, emitters) pair is a fresh process (`--child`; no persistent compilation cache), the pairs
alternate within a round and their order rotates between rounds; each starts once other processes use under 0.25
cores (up to `--quiet-wait` s). Writes OUT.json (every run) and OUT.md (per form, program and emitters, the median over
rounds of compile and run times, and the range).
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
EMITTERS = ("default", "older")
FORMS = ("unrolled", "scan")
CHILD_TIMEOUT_S = 1800


def measure(folder: str, scan_layers: bool, older: bool) -> dict:
  """Compiles and runs the rollout and the train step in this process (call it in a fresh one)."""
  import jax
  import jax.numpy as jnp

  from experiments.benchmarks import ours_grpo
  from tsallis_jax import xla_cpu
  from tsallis_jax.train import compile_ahead, scoring

  # "xla": the programs as `jax.jit` builds them, options given here at compile time instead.
  built = ours_grpo.build(folder, "grpo", scan_layers=scan_layers, cpu_emitters="xla")
  options = dict(xla_cpu.OLDER_EMITTERS) if older else None
  key = jax.random.key(0)
  q_range = jnp.asarray([built.cfg.q, built.cfg.q], jnp.float32)
  out: dict = {}

  def timed(compiled, args_for, n=4):
    times, result = [], None
    for i in range(n):
      t = time.perf_counter()
      result = jax.block_until_ready(compiled(*args_for(i)))
      times.append(time.perf_counter() - t)
    return times, result

  t = time.perf_counter()
  rollout_fn = built.rollout_fn.lower(built.state.params, *built.prompts, key).compile(compiler_options=options)
  out["rollout_compile_s"] = time.perf_counter() - t
  times, rollout = timed(rollout_fn, lambda i: (built.state.params, *built.prompts, jax.random.fold_in(key, i)))
  out["rollout_first_s"], out["rollout_run_s"] = times[0], statistics.median(times[1:])
  reward_funcs, records = ours_grpo.host_rewards(built.spec, folder)
  rewards_BxG = scoring.rollout_rewards(reward_funcs, rollout, records, built.tokenizer, built.mesh,
                                        built.spec.num_prompts)
  batch = {"rollout": rollout, **built.answers, "rewards_BxG": rewards_BxG}
  t = time.perf_counter()
  with jax.set_mesh(built.mesh):
    abstract = jax.tree.map(compile_ahead.abstract, (built.state, built.abstract_batch, key, q_range))
    step_fn = built.train_step.jitted.lower(*abstract).compile(compiler_options=options)
  out["step_compile_s"] = time.perf_counter() - t
  state, times = built.state, []
  for _ in range(4):  # the state is donated: each call takes the previous call's
    t = time.perf_counter()
    state, _ = step_fn(state, batch, key, q_range)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t)
  out["step_first_s"], out["step_run_s"] = times[0], statistics.median(times[1:])
  return out


KEYS = ("rollout_compile_s", "rollout_run_s", "step_compile_s", "step_run_s")


def summary(runs: list[dict]) -> dict[tuple[str, str], dict]:
  """Per (form, emitters): the median and range over rounds of each of `KEYS`."""
  out = {}
  for form in FORMS:
    for emitters in EMITTERS:
      rs = [r for r in runs if r["form"] == form and r["emitters"] == emitters]
      if rs:
        out[(form, emitters)] = {k: (statistics.median(r[k] for r in rs), min(r[k] for r in rs),
                                     max(r[k] for r in rs)) for k in KEYS} | {"runs": len(rs)}
  return out


def write(out: pathlib.Path, runs: list[dict], command: str) -> None:
  from experiments.benchmarks import run as run_lib
  agg = summary(runs)
  m = run_lib.machine()
  cell = lambda v: f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"  # noqa: E731
  lines = ["# Each program alone under each XLA:CPU emitter", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
           f"{run_lib.git_commit()}; machine: {m['cpu']}, {m['cores']} cores",
           f"- command: `{command}`",
           "- seconds, median over rounds (range); `run` = the median of calls 2-4 of the compiled program; "
           "`older` = `xla_cpu_use_fusion_emitters=false`; no persistent compilation cache", "",
           "| form | emitters | rounds | rollout compile | rollout run | train step compile | train step run |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for (form, emitters), a in agg.items():
    lines.append(f"| {form} | {emitters} | {a['runs']} | " + " | ".join(cell(a[k]) for k in KEYS) + " |")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  out.with_suffix(".json").write_text(json.dumps(
      {"command": command, "summary": [{"form": f, "emitters": e, **a} for (f, e), a in agg.items()],
       "runs": runs}, indent=1))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True, help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--out", default=str(HERE / "results" / "program_emitters"), help="writes OUT.json and OUT.md")
  p.add_argument("--quiet-wait", type=float, default=45.0)
  p.add_argument("--child", choices=[f"{f},{e}" for f in FORMS for e in EMITTERS], help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    from tsallis_jax import host_memory
    host_memory.keep_freed_memory()  # as ours_grpo.py: before JAX starts
    form, emitters = args.child.split(",")
    print("PROGRAMS " + json.dumps(measure(args.workload, form == "scan", emitters == "older")), flush=True)
    return 0
  from experiments.benchmarks import run as run_lib
  command = "python -m experiments.benchmarks.program_emitters " + " ".join(argv if argv is not None else sys.argv[1:])
  pairs = [(f, e) for f in args.forms for e in EMITTERS]
  runs = []

  def save_partial():  # a failed child: keep the runs before it
    if runs:
      write(pathlib.Path(args.out), runs, command + "  (stopped early: a run failed)")

  for r in range(args.rounds):
    for form, emitters in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
      cmd = [sys.executable, "-m", "experiments.benchmarks.program_emitters", "--child", f"{form},{emitters}",
             "--workload", args.workload]
      result, load = run_lib.quiet_child_json(
          cmd, "PROGRAMS", CHILD_TIMEOUT_S, args.quiet_wait,
          failed=f"program_emitters child failed ({form}, {emitters}, round {r})",
          save_partial=save_partial)
      runs.append({"form": form, "emitters": emitters, "round": r, "load_before": load, **result})
      print(f"round {r} {form} {emitters}: " + ", ".join(f"{k} {runs[-1][k]:.3f}" for k in KEYS), flush=True)
  write(pathlib.Path(args.out), runs, command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
