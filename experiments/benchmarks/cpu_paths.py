"""Ablation of this project's two CPU-only code paths on the GRPO step: does each pay for itself? (issue 17)

  python -m experiments.benchmarks.cpu_paths [--rounds 2] [--workloads tiny smollm2]

The paths (each documented where it lives):

* `host`: `tsallis_jax.host_memory.keep_freed_memory()`, which the command lines (and `ours_grpo.py`) call before
  JAX starts, so the train step's temporaries stay mapped between steps instead of being faulted in every step;
* `linear`: the hand-written backward of `tsallis_jax.model.transformer.linear` for training-sized projections wider
  than their input on CPU (`_linear_input_transposed_grad`), which keeps XLA from fusing the SwiGLU derivative into
  a strided transposing copy.

(A third, `tsallis_jax.xla_cpu`'s older emitters for a scanned model's rollout, acts only under `--scan-layers`; its
A/B is `cpu_emitters.py`, with these functions.)

Each round runs `ours_grpo.py` (GRPO, the workload's steps) three ways, alternating, each in its own process through
`harness.run`: everything on (the default), `host` off (`--no-host-allocator`), `linear` off
(`--no-cpu-linear-backward`). Writes `results/cpu_paths.json` and `results/cpu_paths.md`: per variant the median
over rounds of each run's warm-step median, the update phase, the first step and the peak RSS, and the ratio of the
default's step to each ablation's (below 1 = the path pays).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys

from experiments.benchmarks import harness, run as run_lib

HERE = pathlib.Path(__file__).resolve().parent
VARIANTS = {"default": [], "host off": ["--no-host-allocator"], "linear off": ["--no-cpu-linear-backward"]}
TITLE = "CPU-only code paths: ablation on the GRPO step"


def main(argv=None) -> int:
  return run_ablation(VARIANTS, "cpu_paths", TITLE, argv, __doc__.splitlines()[0])


def run_ablation(variants: dict[str, list[str]], name: str, title: str, argv, description: str) -> int:
  """Runs `ours_grpo.py` GRPO once per variant (its extra flags) per round and workload, alternating the variants'
  order between rounds, each in its own process with a fresh compile cache; writes results/{name}.json and .md with
  the first variant as the base of the ratios."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--peers-home", default=os.environ.get("PEERS_HOME", os.path.expanduser("~/.cache/peers")))
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--workloads", nargs="+", default=["tiny", "smollm2"])
  p.add_argument("--quiet-wait", type=float, default=45.0)
  p.add_argument("--steps", type=int, default=0, help="steps per run (0 = each workload's grpo_steps)")
  p.add_argument("--out", default=str(HERE / "results"))
  args = p.parse_args(argv)
  home = pathlib.Path(args.peers_home).expanduser()
  env = {"PYTHONPATH": str(run_lib.REPO), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  runs = []
  for r in range(args.rounds):
    for w in args.workloads:
      names = list(variants)
      names = names[r % len(names):] + names[:r % len(names)]  # rotate the order between rounds
      for variant in names:
        load = run_lib.wait_for_quiet(args.quiet_wait)
        with run_lib.fresh_compile_cache() as cache:
          cmd = [*run_lib.job_command("ours", "grpo", home / "workloads" / w, {}, args.steps, cache), *variants[variant]]
          log_name = f"{name}.r{r}.{w}.{variant.replace(' ', '_').replace(',', '')}.log"
          result = harness.run(cmd, str(home / "logs" / log_name), env=env, cwd=str(run_lib.REPO), timeout_s=1800)
        result.update({"round": r, "workload": w, "variant": variant, "load_before": load})
        runs.append(result)
        run_lib.log(f"round {r} {w} {variant}: " + (f"median {result['median_s']:.3f}s, foreign "
                                                     f"{result['foreign_cores']:.2f}" if result["ok"] else "FAILED"))
  write(pathlib.Path(args.out), runs, " ".join(argv if argv is not None else sys.argv[1:]), variants, name, title)
  return 0 if all(r["ok"] for r in runs) else 1


def summary(runs: list[dict], variants=VARIANTS) -> dict[tuple[str, str], dict]:
  out = {}
  for w in sorted({r["workload"] for r in runs}):
    for name in variants:
      rs = [r for r in runs if r["ok"] and r["workload"] == w and r["variant"] == name]
      if not rs:
        continue
      update = [v for r in rs for k, v in r["phases_median_s"].items() if k.startswith("update")]
      rollout = [r["phases_median_s"]["rollout"] for r in rs if "rollout" in r["phases_median_s"]]
      out[(w, name)] = {"median_s": statistics.median(r["median_s"] for r in rs),
                        "update_s": statistics.median(update) if update else None,
                        "rollout_s": statistics.median(rollout) if rollout else None,
                        "first_s": statistics.median(r["first_s"] for r in rs),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                        "foreign_cores": [r["foreign_cores"] for r in rs], "runs": len(rs)}
  return out


def write(out: pathlib.Path, runs: list[dict], args: str, variants=VARIANTS, name: str = "cpu_paths",
          title: str = TITLE) -> None:
  agg = summary(runs, variants)
  first = next(iter(variants))
  fmt = lambda x: f"{x:.3f}" if x is not None else ""  # noqa: E731
  lines = [f"# {title}", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {run_lib.git_commit()}",
           f"- command: `python -m experiments.benchmarks.{name} {args}`".rstrip(), "",
           f"| workload | variant | s/step | rollout s | update s | first step s | peak RSS MB | {first} / this (step) "
           "| runs | foreign cores |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for (w, variant), a in agg.items():
    base = agg.get((w, first))
    ratio = f"{base['median_s'] / a['median_s']:.3f}" if base else ""
    lines.append(f"| {w} | {variant} | {a['median_s']:.3f} | {fmt(a['rollout_s'])} | {fmt(a['update_s'])} | "
                 f"{a['first_s']:.1f} | {a['peak_rss_mb']:.0f} | {ratio} | {a['runs']} | "
                 f"{', '.join(f'{x:.2f}' for x in a['foreign_cores'])} |")
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.md").write_text("\n".join(lines) + "\n")
  (out / f"{name}.json").write_text(json.dumps(
      {"summary": [{"workload": w, "variant": n, **a} for (w, n), a in agg.items()], "runs": runs}, indent=1))


if __name__ == "__main__":
  sys.exit(main())
