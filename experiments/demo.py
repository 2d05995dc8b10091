"""The CPU demo: does GRPO / low q stall at cold start while GARL at q >= 0.75 escapes? (spec 1.5, Table 1)

    python -m experiments.demo                 # default: 2 seeds, sized for ~10 min on 2 idle CPU cores
    python -m experiments.demo --long          # 5 seeds, twice the steps
    python -m experiments.demo --pretrain-only # only build (or find) the cached pretrained model and measure p0

1. Pretrain a tiny LM (tsallis_jax.train.pretrain) on the synthetic source task plus target-task chains with random
   answers; cached under $TSALLIS_JAX_CACHE/demo_pretrain/ (default ~/.cache/tsallis_jax) after the first run.
2. Measure its cold-start p0 on the held-out test prompts (16 sampled rationales per prompt, teacher-forced w).
3. From that one checkpoint, train GRPO, GARL q in {0, .5, .75, 1} and PAFT q = .75, each for the same number of
   steps with the same rollout budget (B prompts x G samples per step), several seeds each (experiments/configs/
   demo.py holds every setting). All runs share the compiled programs (q is a traced argument).
4. Write experiments/results/demo_table.md (the paper's format: p@1, p@16, m@16 on held-out prompts, x100, from the
   best-by-validation-maj@16 checkpoint, plus the escape step), demo.json (everything, curves included) and
   demo_escape.png (training success rate per step).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

METHODS = (("grpo", None), ("garl", 0.0), ("garl", 0.5), ("garl", 0.75), ("garl", 1.0), ("paft", 0.75))
ESCAPE_LEVEL = 0.5
SMOOTH = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pretrain_setup():
  from experiments.configs import demo as demo_cfg
  from tsallis_jax.data import synthetic
  from tsallis_jax.train import loop, pretrain, tasks
  from tsallis_jax.train.config import TrainConfig
  probe = TrainConfig(model=demo_cfg.DEMO_MODEL, task="synthetic", task_options=demo_cfg.DEMO_TASK_OPTIONS)
  model_cfg = loop.model_config(probe, vocab_size=len(synthetic.make_tokenizer()))
  target, _ = tasks.synthetic_target(probe)
  return model_cfg, target, pretrain.PretrainConfig(steps=800)


def pretrained_params_path() -> str:
  """Where the demo's pretrained params live (they exist once `python -m experiments.demo` has run)."""
  from tsallis_jax.model.gguf_io import cache_root
  from tsallis_jax.train import pretrain
  model_cfg, target, recipe = _pretrain_setup()
  return str(cache_root() / "demo_pretrain" / pretrain.cache_key(model_cfg, target, recipe) / "params")


def method_name(estimator: str, q: float | None) -> str:
  return "GRPO" if estimator == "grpo" else f"{estimator.upper()} q={q:g}"


def escape_step(steps: list[int], success: list[float]) -> int | None:
  """First step at which the SMOOTH-step moving average of the training success rate reaches ESCAPE_LEVEL."""
  for i in range(len(success)):
    window = success[max(0, i - SMOOTH + 1):i + 1]
    if len(window) == SMOOTH and np.mean(window) >= ESCAPE_LEVEL:
      return steps[i]
  return None


def _fmt(values: list[float]) -> str:
  a = 100 * np.asarray(values)
  return f"{a.mean():.1f}" if len(a) == 1 else f"{a.mean():.1f} ± {a.std():.1f}"


def write_table(path: str, summary: dict) -> str:
  lines = [
      "# CPU demo: cold start on the synthetic chain task (measured)", "",
      f"Command: `{summary['command']}` (commit {summary['commit']}). Wall time {summary['wall_s'] / 60:.1f} min, "
      f"CPU time {summary['cpu_s'] / 60:.1f} min (pretraining {summary['pretrain']['status']}, "
      f"{summary['pretrain'].get('sft_seconds', 0):.0f} s when trained).", "",
      f"Cold-start p0 of the pretrained model on the {summary['p0']['p0_prompts']} test prompts: "
      f"**{summary['p0']['p0_likelihood']:.4f}** (mean teacher-forced w = p(y*|x,z) over "
      f"{summary['p0']['p0_samples_per_prompt']} sampled rationales per prompt), sampled exact-match success "
      f"{summary['p0']['p0_sampled_exact_match']:.4f}; nominal 1/100.", "",
      f"Each run: {summary['steps']} steps x {summary['batch_size']} prompts x {summary['num_samples']} samples "
      f"(the same rollout budget for every method), seeds {summary['seeds']}. Test metrics (x100, mean ± std over "
      "seeds) on the held-out test prompts, 16 samples each, from the best-by-validation-maj@16 checkpoint; escape = "
      f"first step whose {SMOOTH}-step moving average of the training success rate reaches {ESCAPE_LEVEL}.", "",
      "| method | p@1 | p@16 | m@16 | escaped | escape step (per seed) |", "|---|---|---|---|---|---|",
      f"| pretrained, no RL | {_fmt([summary['initial']['test/p@1']])} | {_fmt([summary['initial']['test/pass@16']])}"
      f" | {_fmt([summary['initial']['test/maj@16']])} | | |"]
  for name, runs in summary["methods"].items():
    esc = [r["escape_step"] for r in runs]
    lines.append(
        f"| {name} | {_fmt([r['test/p@1'] for r in runs])} | {_fmt([r['test/pass@16'] for r in runs])} | "
        f"{_fmt([r['test/maj@16'] for r in runs])} | {sum(e is not None for e in esc)}/{len(esc)} | "
        f"{', '.join('—' if e is None else str(e) for e in esc)} |")
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text


def plot(path: str, summary: dict) -> None:
  """Left: the training success rate (sampled exact match); right: GARL / PAFT's teacher-forced P-hat (log scale)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, ax_w) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(summary["methods"])))
  kernel = np.ones(SMOOTH) / SMOOTH
  for color, (name, runs) in zip(colors, summary["methods"].items()):
    style = "--" if "PAFT" in name else "-"
    curves, w_curves = [], []
    for r in runs:
      steps = np.asarray(r["curve"]["step"])[SMOOTH - 1:]
      smooth = np.convolve(np.asarray(r["curve"]["success"]), kernel, mode="valid")
      ax.plot(steps, smooth, color=color, alpha=0.25, lw=0.8, ls=style)
      curves.append(smooth)
      if r["curve"]["weight_mean"][0] is not None:
        w = np.convolve(np.asarray(r["curve"]["weight_mean"], float), kernel, mode="valid")
        ax_w.plot(steps, w, color=color, alpha=0.25, lw=0.8, ls=style)
        w_curves.append(w)
    ax.plot(steps, np.mean(curves, axis=0), color=color, lw=2, label=name, ls=style)
    if w_curves:
      ax_w.plot(steps, np.mean(w_curves, axis=0), color=color, lw=2, label=name, ls=style)
  for a in (ax, ax_w):
    a.axhline(ESCAPE_LEVEL, color="gray", lw=0.8, ls=":")
    a.axhline(summary["p0"]["p0_likelihood"], color="red", lw=0.8, ls=":", label="cold-start p0")
    a.set_xlabel("training step")
  ax.set_ylabel(f"training success rate ({SMOOTH}-step mean)")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title("sampled exact match (all methods)")
  ax.legend(fontsize=8, loc="upper left")
  ax_w.set_yscale("log")
  ax_w.set_ylabel(f"mean w = p(y*|x,z) ({SMOOTH}-step mean)")
  ax_w.set_title("teacher-forced P-hat (GARL, PAFT)")
  fig.suptitle(f"Cold start, {summary['steps']} steps x {summary['batch_size']} prompts x {summary['num_samples']}"
               " samples (thin: seeds, thick: mean)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--long", action="store_true", help="5 seeds and twice the steps")
  parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2, or 5 with --long)")
  parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the demo config's)")
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"), help="results folder")
  parser.add_argument("--workroot", default="/tmp/tsallis_demo", help="run folders (checkpoints, metrics.jsonl)")
  parser.add_argument("--pretrain-only", action="store_true")
  parser.add_argument("--methods", default="", help="comma list of method indices into METHODS (default all)")
  parser.add_argument("--replot", metavar="JSON", help="rewrite the table and PNG from a saved demo JSON and exit")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the demo config for every run (an ablation; use with --tag)")
  parser.add_argument("--tag", default="", help="suffix of the output files (demo_<tag>.json, ...)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  if args.replot:
    with open(args.replot) as f:
      summary = json.load(f)
    suffix = os.path.basename(os.path.splitext(args.replot)[0])[len("demo"):]
    print(write_table(os.path.join(os.path.dirname(args.replot), f"demo_table{suffix}.md"), summary))
    plot(os.path.join(os.path.dirname(args.replot), f"demo_escape{suffix}.png"), summary)
    return 0

  import jax
  from flax import nnx

  from experiments.configs import demo as demo_cfg
  from tsallis_jax.model import Transformer
  from tsallis_jax.train import checkpoint as ckpt_lib
  from tsallis_jax.train import loop, pretrain, tasks
  from tsallis_jax.train.config import apply_overrides
  from tsallis_jax.train.loop import train_and_evaluate
  from tsallis_jax.train.state import pure

  wall0, cpu0 = time.perf_counter(), time.process_time()
  model_cfg, target, recipe = _pretrain_setup()
  cached = os.path.exists(os.path.join(os.path.dirname(pretrained_params_path()), "info.json"))
  params_path, info = pretrain.pretrained_demo_model(model_cfg, target, recipe)
  base = demo_cfg.get_config()
  task = tasks.build_task(base)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  params = ckpt_lib.load_params(params_path, pure(abstract))
  p0 = pretrain.measure_p0(graphdef, params, task.test, task.tokenizer, num_samples=16,
                           max_prompt_len=base.max_prompt_len, rationale_budget=base.rationale_budget,
                           max_answer_len=base.max_answer_len)
  print(f"cold-start p0 = {p0['p0_likelihood']:.4f} (likelihood), {p0['p0_sampled_exact_match']:.4f} (sampled)")
  if args.pretrain_only:
    return 0

  seeds = args.seeds or (5 if args.long else 2)
  steps = args.steps or base.num_steps * (2 if args.long else 1)
  base = apply_overrides(base.replace(num_steps=steps, eval_every=max(steps // 3, 1)), args.set)
  methods = [METHODS[int(i)] for i in args.methods.split(",")] if args.methods else list(METHODS)
  os.makedirs(args.workroot, exist_ok=True)

  # The pretrained model itself, evaluated like the runs (test split, 16 samples per prompt, same sampling settings).
  s = loop.setup(base, task)
  initial = loop.evaluate_split(s, loop.initial_params(s), task.test, "test", 0)
  print(f"pretrained model: test p@1 {initial['test/p@1']:.3f} pass@16 {initial['test/pass@16']:.3f} "
        f"maj@16 {initial['test/maj@16']:.3f}", flush=True)
  command = " ".join(["python -m experiments.demo"] + (["--long"] if args.long else [])
                     + ([f"--seeds {args.seeds}"] if args.seeds else [])
                     + ([f"--steps {args.steps}"] if args.steps else [])
                     + ([f"--methods {args.methods}"] if args.methods else []) + [f"--set {o}" for o in args.set]
                     + ([f"--tag {args.tag}"] if args.tag else []))
  summary = {"command": command,
             "commit": _commit(), "p0": p0, "steps": steps, "batch_size": base.batch_size,
             "num_samples": base.num_samples, "seeds": list(range(seeds)), "initial": initial,
             "pretrain": {"status": "cached" if cached else "trained", **info}, "methods": {},
             "config": base.to_dict()}
  for estimator, q in methods:
    name = method_name(estimator, q)
    summary["methods"][name] = []
    for seed in range(seeds):
      cfg = base.replace(estimator=estimator, q=0.0 if q is None else q, seed=seed,
                         name=f"{estimator}_q{q}_s{seed}")
      workdir = _fresh(os.path.join(args.workroot, cfg.name))
      t = time.perf_counter()
      results = train_and_evaluate(cfg, workdir, task=task)
      rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
      train_rows = [r for r in rows if "reward/mean" in r]
      curve = {"step": [r["step"] for r in train_rows], "success": [r["reward/mean"] for r in train_rows],
               "weight_mean": [r.get("weight/mean") for r in train_rows]}
      run = {"seed": seed, **{k: v for k, v in results.items() if k.startswith("test/")}, "best": results["best"],
             "escape_step": escape_step(curve["step"], curve["success"]), "curve": curve,
             "wall_s": time.perf_counter() - t}
      summary["methods"][name].append(run)
      print(f"{name:>14} seed {seed}: test p@1 {run['test/p@1']:.3f} pass@16 {run['test/pass@16']:.3f} "
            f"maj@16 {run['test/maj@16']:.3f} escape {run['escape_step']} ({run['wall_s']:.0f} s)", flush=True)
  summary["wall_s"] = time.perf_counter() - wall0
  summary["cpu_s"] = time.process_time() - cpu0
  summary["devices"] = str(jax.devices())
  os.makedirs(args.out, exist_ok=True)
  suffix = ("_long" if args.long else "") + (f"_{args.tag}" if args.tag else "")
  with open(os.path.join(args.out, f"demo{suffix}.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(write_table(os.path.join(args.out, f"demo_table{suffix}.md"), summary))
  plot(os.path.join(args.out, f"demo_escape{suffix}.png"), summary)
  return 0


def _fresh(path: str) -> str:
  shutil.rmtree(path, ignore_errors=True)
  return path


def _commit() -> str:
  import subprocess
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


if __name__ == "__main__":
  sys.exit(main())
