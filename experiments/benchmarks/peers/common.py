"""What every benchmark runner shares: the workload spec, the result line, step medians.

This file is imported by the peer runners inside the peers' own virtual environments (tunix's, TRL's), so it uses
only the standard library. Each runner prints exactly one line

  BENCH_RESULT {"system": ..., "workload": ..., "mode": ..., "times_s": [...], ...}

that `experiments.benchmarks.harness` parses; everything else a runner prints is kept in its log.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Sequence

RESULT_PREFIX = "BENCH_RESULT "
SANITY_IDS = (5, 6, 7)  # last-position logits of this input, ids 0..4, are printed by every runner


def parse_args(argv: Sequence[str] | None = None, modes: Sequence[str] = ("grpo", "sample")):
  import argparse
  p = argparse.ArgumentParser()
  p.add_argument("--workload", required=True, help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--mode", choices=list(modes), default=modes[0])
  p.add_argument("--steps", type=int, default=0, help="0: the workload's grpo_steps / sample_steps")
  p.add_argument("--beta", type=float, default=None, help="default: the workload's beta")
  return p.parse_args(argv)


def read_spec(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "workload.json")
  if not os.path.exists(path):
    raise SystemExit(f"{path} is missing: build the workload first (python -m experiments.benchmarks.workloads).")
  with open(path) as f:
    return json.load(f)


def read_prompts(folder: str) -> tuple[list[str], str]:
  with open(os.path.join(folder, "prompts.json")) as f:
    d = json.load(f)
  return d["prompts"], d["reward_token"]


def reward_contains(reward_token: str, completions: Sequence[str]) -> list[float]:
  """THE reward: 1.0 when the completion's whitespace-split words contain the reward token."""
  return [1.0 if reward_token in c.split() else 0.0 for c in completions]


def steps_for(args, spec: dict[str, Any]) -> int:
  steps = args.steps or (spec["grpo_steps"] if args.mode != "sample" else spec["sample_steps"])
  if steps < 2:
    raise SystemExit(f"--steps={steps}: need at least 2 (step 0 is compile / warm-up and is excluded).")
  return steps


def emit(*, system: str, version: str, spec: dict[str, Any], mode: str, times_s: Sequence[float],
         tokens_per_step: int, phases: dict[str, Sequence[float]] | None = None,
         sanity: Sequence[float] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Prints the BENCH_RESULT line: all step times (step 0 = compile / warm-up), the warm median, tokens/s."""
  warm = list(times_s[1:])
  med = statistics.median(warm)
  result = {
    "system": system, "version": version, "workload": spec["name"], "mode": mode,
    "times_s": [round(t, 5) for t in times_s], "first_s": round(times_s[0], 4), "median_s": round(med, 5),
    "tokens_per_step": tokens_per_step, "tokens_per_s": round(tokens_per_step / med, 1),
    "phases_median_s": {k: round(statistics.median(v[1:] if len(v) > 1 else v), 5)
                        for k, v in (phases or {}).items() if v},
    "sanity_logits": [float(x) for x in sanity] if sanity is not None else None,
    "extra": extra or {},
  }
  print(RESULT_PREFIX + json.dumps(result), flush=True)
  sys.stdout.flush()
  return result
