"""The CPU demo: which prompts does each q learn from a cold start? (spec 1.4-1.6, Table 1; issue 14)

    python -m experiments.demo                 # default: 8 methods x 3 seeds, sized for ~10 min on 2 idle CPU cores
    python -m experiments.demo --long          # 5 seeds, twice the steps
    python -m experiments.demo --set optimizer=sgd --set learning_rate=0.1 --set normalize_mq=false --tag sgd
                                               # the theory's setting (plain gradient descent), pre-registered too
    python -m experiments.demo --pretrain-only # only build (or find) the cached pretrained model and measure p0

1. Pretrain a tiny LM (tsallis_jax.train.pretrain) on the mixed-difficulty chain task's source tasks plus its target
   chains with random answers; cached under $TSALLIS_JAX_CACHE/demo_pretrain/ (default ~/.cache/tsallis_jax).
2. Measure its cold-start P on every held-out test prompt (16 sampled rationales each, teacher-forced w) and on the
   probe prompts (training prompts, a fixed number per difficulty bucket): demo_p0_hist.png.
3. From that one checkpoint, train GRPO, GARL q in {0, .25, .5, .75, 1} and PAFT q in {.75, 1}, each for the same
   number of steps with the same rollout budget (B prompts x G samples per step), several seeds each
   (experiments/configs/demo.py holds every setting). Every PROBE_EVERY steps the probe prompts' teacher-forced P-hat
   is measured, which gives each prompt's escape step (demo_escape.png, demo_curves.png).
4. Write experiments/results/demo_table.md (Table 1's format, overall and by bucket, from the best-by-validation-
   maj@16 checkpoint with step 0 a candidate; the per-prompt escape table with fitted slopes), demo.json (everything).
The prediction these are read against is experiments/results/demo_prediction.md (committed before the results).
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

METHODS = (("grpo", None), ("garl", 0.0), ("garl", 0.25), ("garl", 0.5), ("garl", 0.75), ("garl", 1.0),
           ("paft", 0.75), ("paft", 1.0))
PROBE_PER_BUCKET = 16  # training prompts per bucket whose P-hat is followed
PROBE_EVERY = 10  # steps between probes (step 0 included)
PROBE_SAMPLES = 4  # sampled rationales per probe prompt (the pretrained model's p0 of them uses P0_SAMPLES)
P0_SAMPLES = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pretrain_setup():
  from experiments.configs import demo as demo_cfg
  from tsallis_jax.data import synthetic
  from tsallis_jax.model.build import preset_config
  from tsallis_jax.train import pretrain, tasks
  from tsallis_jax.train.config import model_spec
  probe = demo_cfg.get_config()
  model_cfg = preset_config(model_spec(probe), vocab_size=len(synthetic.make_tokenizer()))
  mix, _ = tasks.synthetic_target(probe)
  return model_cfg, mix, pretrain.PretrainConfig(steps=demo_cfg.DEMO_PRETRAIN_STEPS)


def pretrained_params_path() -> str:
  """Where the demo's pretrained params live (they exist once `python -m experiments.demo` has run)."""
  from tsallis_jax.model.gguf_io import cache_root
  from tsallis_jax.train import pretrain
  model_cfg, mix, recipe = _pretrain_setup()
  return str(cache_root() / "demo_pretrain" / pretrain.cache_key(model_cfg, mix, recipe) / "params")


def method_name(estimator: str, q: float | None) -> str:
  return "GRPO" if estimator == "grpo" else f"{estimator.upper()} q={q:g}"


def probe_records(records, buckets, per_bucket: int):
  """The first `per_bucket` training records of each bucket (fixed: the same prompts for every run)."""
  chosen = []
  for b in buckets:
    chosen += [r for r in records if r.dataset.split("/")[-1] == b][:per_bucket]
  return chosen


class Probe:
  """`observe` hook of the loop: every `every` steps, the teacher-forced P-hat of each probe prompt."""

  def __init__(self, score, records, tokenizer, cfg, every: int, seed: int):
    import jax
    self.score, self.records, self.tokenizer, self.cfg, self.every = score, records, tokenizer, cfg, every
    self.key = jax.random.key(seed + 7_000_003)
    self.steps: list[int] = []
    self.p_hat: list[list[float]] = []

  def __call__(self, step: int, params) -> None:
    import jax

    from tsallis_jax.train import success
    if step % self.every and step != self.cfg.num_steps:
      return
    out = success.success_by_prompt(self.score, params, self.records, self.tokenizer,
                                    key=jax.random.fold_in(self.key, step), max_prompt_len=self.cfg.max_prompt_len,
                                    max_answer_len=self.cfg.max_answer_len, batch_size=len(self.records))
    self.steps.append(step)
    self.p_hat.append([round(float(v), 7) for v in out["p_hat"]])


def _quantiles(x) -> dict[str, float]:
  x = np.asarray(x, float)
  return {"mean": float(x.mean()), "q05": float(np.quantile(x, 0.05)), "median": float(np.median(x)),
          "q95": float(np.quantile(x, 0.95)), "min": float(x.min()), "max": float(x.max())}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.splitlines()[0])
  parser.add_argument("--long", action="store_true", help="5 seeds and twice the steps")
  parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, or 5 with --long)")
  parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the demo config's)")
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"), help="results folder")
  parser.add_argument("--workroot", default="/tmp/tsallis_demo",
                      help="run folders (checkpoints, metrics.jsonl) go to WORKROOT/<default|long|tag>/<run>")
  parser.add_argument("--pretrain-only", action="store_true")
  parser.add_argument("--methods", default="", help="comma list of method indices into METHODS (default all)")
  parser.add_argument("--replot", metavar="JSON", help="rewrite the table and PNGs from a saved demo JSON and exit")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the demo config for every run (an ablation; use with --tag)")
  parser.add_argument("--tag", default="", help="suffix of the output files (demo_<tag>.json, ...)")
  args = parser.parse_args(argv)
  from tsallis_jax import host_memory
  host_memory.keep_freed_memory()  # before JAX starts its backend (as experiments/train.py)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  from experiments import demo_report
  if args.replot:
    with open(args.replot) as f:
      summary = json.load(f)
    suffix = os.path.basename(os.path.splitext(args.replot)[0])[len("demo"):]
    print(demo_report.write_all(os.path.dirname(args.replot), suffix, summary))
    return 0

  import jax
  from flax import nnx

  from experiments.configs import demo as demo_cfg
  from tsallis_jax.model import Transformer
  from tsallis_jax.train import checkpoint as ckpt_lib
  from tsallis_jax.train import loop, pretrain, success, tasks
  from tsallis_jax.train.config import apply_overrides
  from tsallis_jax.train.loop import train_and_evaluate
  from tsallis_jax.train.state import pure

  wall0, cpu0 = time.perf_counter(), time.process_time()
  model_cfg, mix, recipe = _pretrain_setup()
  cached = os.path.exists(os.path.join(os.path.dirname(pretrained_params_path()), "info.json"))
  params_path, info = pretrain.pretrained_demo_model(model_cfg, mix, recipe)
  _link_as_demo_init(params_path)
  seeds = args.seeds or (5 if args.long else 3)
  base = demo_cfg.get_config().replace(init_checkpoint=params_path)
  steps = args.steps or base.num_steps * (2 if args.long else 1)
  base = apply_overrides(base.replace(num_steps=steps, eval_every=max(steps // 4, 1)), args.set)
  task = tasks.build_task(base)
  buckets = list(mix.buckets)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  params = ckpt_lib.load_params(params_path, pure(abstract))
  p0 = pretrain.measure_p0(graphdef, params, task.test, task.tokenizer, num_samples=P0_SAMPLES,
                           max_prompt_len=base.max_prompt_len, rationale_budget=base.rationale_budget,
                           max_answer_len=base.max_answer_len, batch_size=64)
  test_buckets = [r.dataset.split("/")[-1] for r in task.test]
  by_bucket = {b: _quantiles([p for p, tb in zip(p0["p_hat_by_prompt"], test_buckets) if tb == b]) for b in buckets}
  print(f"cold-start p0 = {p0['p0_likelihood']:.4f} (likelihood), {p0['p0_sampled_exact_match']:.4f} (sampled); "
        + ", ".join(f"{b} {v['mean']:.2e}" for b, v in by_bucket.items()), flush=True)
  if args.pretrain_only:
    return 0

  # The probe prompts and their p0 (more samples than the periodic probe: the x axis of the escape plot).
  probes = probe_records(task.train, buckets, PROBE_PER_BUCKET)
  ids = dict(stop_ids=task.stop_ids, pad_id=task.pad_id, close_tag_ids=task.close_tag_ids)
  probe_p0 = success.success_by_prompt(
      success.make_scorer(graphdef, num_samples=P0_SAMPLES, rationale_budget=base.rationale_budget,
                          max_answer_len=base.max_answer_len, **ids),
      params, probes, task.tokenizer, key=jax.random.key(11), max_prompt_len=base.max_prompt_len,
      max_answer_len=base.max_answer_len, batch_size=len(probes))["p_hat"]
  probe_score = success.make_scorer(graphdef, num_samples=PROBE_SAMPLES, rationale_budget=base.rationale_budget,
                                    max_answer_len=base.max_answer_len, **ids)
  methods = [METHODS[int(i)] for i in args.methods.split(",")] if args.methods else list(METHODS)
  suffix = ("_long" if args.long else "") + (f"_{args.tag}" if args.tag else "")
  workroot = os.path.join(args.workroot, suffix.strip("_") or "default")  # a tagged run keeps the default's folders
  os.makedirs(workroot, exist_ok=True)

  # The pretrained model itself, evaluated like the runs (test split, 16 samples per prompt, same sampling settings).
  s, _ = loop.setup(base, task)
  initial = loop.evaluate_split(s, loop.initial_params(s), task.test, "test", 0)
  print(f"pretrained model: test p@1 {initial['test/p@1']:.3f} pass@16 {initial['test/pass@16']:.3f} "
        f"maj@16 {initial['test/maj@16']:.3f}", flush=True)
  command = " ".join(["python -m experiments.demo"] + (["--long"] if args.long else [])
                     + ([f"--seeds {args.seeds}"] if args.seeds else [])
                     + ([f"--steps {args.steps}"] if args.steps else [])
                     + ([f"--methods {args.methods}"] if args.methods else []) + [f"--set {o}" for o in args.set]
                     + ([f"--tag {args.tag}"] if args.tag else []))
  optimizer_label = (f"{base.optimizer}, lr {base.learning_rate:g}"
                     + ("" if base.normalize_mq else ", no 1/M^q"))
  summary = {"command": command, "commit": _commit(), "p0": p0, "p0_by_bucket": by_bucket,
             "p0_quantiles": _quantiles(p0["p_hat_by_prompt"]), "test_buckets": test_buckets, "buckets": buckets,
             "test_prompts": len(task.test), "steps": steps, "batch_size": base.batch_size,
             "num_samples": base.num_samples, "seeds": list(range(seeds)), "initial": initial,
             "optimizer_label": optimizer_label,
             "probe": {"per_bucket": PROBE_PER_BUCKET, "every": PROBE_EVERY, "samples": PROBE_SAMPLES,
                       "ids": [r.id for r in probes], "bucket": [r.dataset.split("/")[-1] for r in probes],
                       "p0": [float(v) for v in probe_p0]},
             "pretrain": {"status": "cached" if cached else "trained", **info}, "methods": {},
             "config": base.to_dict()}
  programs = {}  # compiled once per estimator: runs that differ only in q and seed share them (PROGRAM_NEUTRAL)
  for estimator, q in methods:
    name = method_name(estimator, q)
    summary["methods"][name] = []
    for seed in range(seeds):
      cfg = base.replace(estimator=estimator, q=0.0 if q is None else q, seed=seed,
                         name=f"{estimator}_q{q}_s{seed}")
      workdir = _fresh(os.path.join(workroot, cfg.name))
      probe = Probe(probe_score, probes, task.tokenizer, cfg, PROBE_EVERY, seed)
      t = time.perf_counter()
      if estimator not in programs:
        programs[estimator] = loop.setup(cfg, task)[0].programs
      results = train_and_evaluate(cfg, workdir, task=task, observe=probe, programs=programs[estimator])
      rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
      train_rows = [r for r in rows if "reward" in r]
      curve = {k: [r.get(m) for r in train_rows] for k, m in (
          ("step", "step"), ("success", "reward"), ("weight_mean", "weight/mean"), ("kl_ref", "kl"),
          ("grad_norm", "grad_norm"))}
      run = {"seed": seed, "estimator": estimator, "q": q,
             **{k: v for k, v in results.items() if k.startswith("test/")}, "best": results["best"],
             "probe": {"steps": probe.steps, "p_hat": probe.p_hat}, "curve": curve,
             "wall_s": time.perf_counter() - t}
      summary["methods"][name].append(run)
      esc = demo_report.run_escapes(run)
      print(f"{name:>14} seed {seed}: test p@1 {run['test/p@1']:.3f} pass@16 {run['test/pass@16']:.3f} "
            f"maj@16 {run['test/maj@16']:.3f} (best step {run['best']['step']}); probe prompts escaped "
            f"{int(np.isfinite(esc).sum())}/{len(esc)} ({run['wall_s']:.0f} s)", flush=True)
  summary["wall_s"] = time.perf_counter() - wall0
  summary["cpu_s"] = time.process_time() - cpu0
  summary["devices"] = str(jax.devices())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"demo{suffix}.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(demo_report.write_all(args.out, suffix, summary))
  return 0


def _link_as_demo_init(params_path: str) -> None:
  """Points `demo_pretrain/demo` (the demo config's literal init_checkpoint) at this recipe's cached folder."""
  folder = os.path.dirname(params_path)
  link = os.path.join(os.path.dirname(folder), "demo")
  tmp = f"{link}.{os.getpid()}.tmp"
  os.symlink(os.path.basename(folder), tmp)
  os.replace(tmp, link)


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
