"""First-step (compile) time and warm run time against depth: layers under `nnx.scan` vs the unrolled loop.

  python -m experiments.benchmarks.compile_depth [--depths 2 8 30] [--reps 3] [--no-sampler] [--cpu-emitters xla]

SmolLM2-135M widths (`ModelConfig.smollm2_135m(num_layers=L)`: D 576, F 1536, 9/3 heads of 64, V 49152, tied),
random weights, float32, on the default backend (CPU unless told otherwise), for each depth L and both forms
(`scan_layers=True` / `False`), in one process, alternating the forms:

* `train`: the jitted forward + backward of a GRPO-like loss on the `smollm2` benchmark shape (8 sequences x 48
  tokens: 32 prompt + 16 completion): token log-probs of the completion, PPO-clip 0.2 ratio against fixed old
  log-probs, group-normalised advantages (2 prompts x G = 4), k3 KL (beta 0.04) to fixed reference log-probs;
  returns the loss and the gradient of every parameter;
* `sample`: the sampler's jitted `generate`: 8 rows (8 distinct 32-token prompts, G = 1), 16 new tokens,
  temperature 1, no stop ids, so every call runs prefill and all 16 decode steps.

An untimed warm-up (a tiny model in both forms) first takes the process's one-time costs (backend start, the first
XLA compile). Each measurement builds a fresh `jax.jit` after `jax.clear_caches()` with the persistent compilation
cache off, and
times lowering (trace), XLA compilation and the first run separately; `first` is their sum (what a first call costs).
`warm` is the median of `--reps` further calls of the compiled function, the two forms' calls interleaved.
`--cpu-emitters` compiles the scanned form's programs as `TrainConfig.cpu_emitters` would on CPU (`tsallis_jax.xla_cpu`:
`train` as the train step, `sample` as the rollout; unrolled programs keep XLA's default under every choice); the
default, `xla`, is XLA's default everywhere, as before the option existed.
Writes `results/compile_depth.json` and `results/compile_depth.md` (`compile_depth_<choice>.*` for another choice).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from tsallis_jax import xla_cpu  # noqa: E402
from tsallis_jax.model import ModelConfig, create_model, make_attention_mask, make_positions  # noqa: E402
from tsallis_jax.sampler import SamplingConfig, generate_impl  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
ROWS, GROUP, PROMPT_LEN, NEW_TOKENS = 8, 4, 32, 16
CLIP_EPS, KL_BETA = 0.2, 0.04
FORMS = {"scan": True, "unrolled": False}


def grpo_like_loss(params, graphdef, tokens_NxT, old_logp_NxC, ref_logp_NxC, reward_N):
  """PPO-clip + k3 KL over the completion tokens, group-normalised advantages (the `smollm2` GRPO step's loss)."""
  model = nnx.merge(graphdef, params)
  pad_NxT = jnp.ones_like(tokens_NxT, bool)
  logits_NxTxV, _ = model(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))
  logp_NxTxV = jax.nn.log_softmax(logits_NxTxV[:, PROMPT_LEN - 1:-1], axis=-1)
  logp_NxC = jnp.take_along_axis(logp_NxTxV, tokens_NxT[:, PROMPT_LEN:, None], axis=-1)[..., 0]
  reward_BxG = reward_N.reshape(-1, GROUP)
  adv_BxG = (reward_BxG - reward_BxG.mean(1, keepdims=True)) / (reward_BxG.std(1, keepdims=True) + 1e-4)
  adv_Nx1 = adv_BxG.reshape(-1, 1)
  ratio_NxC = jnp.exp(logp_NxC - old_logp_NxC)
  clipped_NxC = jnp.minimum(ratio_NxC * adv_Nx1, jnp.clip(ratio_NxC, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv_Nx1)
  kl_NxC = jnp.exp(ref_logp_NxC - logp_NxC) - (ref_logp_NxC - logp_NxC) - 1
  return -jnp.mean(clipped_NxC - KL_BETA * kl_NxC)


def _train_fn():
  return jax.jit(jax.value_and_grad(grpo_like_loss), static_argnums=1)


def _sample_fn():
  return jax.jit(generate_impl, static_argnames=("graphdef", "config"))


def _timed_first(jitted, *args, compiler_options=None, **kwargs) -> tuple[dict, object]:
  """Lower, compile (with `compiler_options`), run once (a first call, split in three); returns the times and the
  compiled function."""
  jax.clear_caches()
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile(compiler_options=compiler_options)
  t2 = time.perf_counter()
  jax.block_until_ready(compiled(*_dynamic(args, kwargs)[0], **_dynamic(args, kwargs)[1]))
  t3 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "first_run_s": t3 - t2, "first_s": t3 - t0}, compiled


def _dynamic(args, kwargs):
  """The arguments a compiled function takes: the static ones (graphdef, config) are baked in."""
  return ([a for a in args if not isinstance(a, nnx.GraphDef)],
          {k: v for k, v in kwargs.items() if k not in ("graphdef", "config")})


def _inputs(cfg: ModelConfig):
  rng = np.random.default_rng(0)
  tokens_NxT = jnp.asarray(rng.integers(3, cfg.vocab_size, (ROWS, PROMPT_LEN + NEW_TOKENS)), jnp.int32)
  old_logp_NxC = jnp.asarray(-10.0 + 0.1 * rng.standard_normal((ROWS, NEW_TOKENS)), jnp.float32)
  ref_logp_NxC = jnp.asarray(-10.0 + 0.1 * rng.standard_normal((ROWS, NEW_TOKENS)), jnp.float32)
  reward_N = jnp.asarray(rng.integers(0, 2, ROWS), jnp.float32)
  return tokens_NxT, old_logp_NxC, ref_logp_NxC, reward_N


def measure_depth(depth: int, reps: int, sampler: bool, order: tuple[str, ...], cpu_emitters: str = "xla"
                  ) -> list[dict]:
  """Both forms at one depth: first-call times per form, then interleaved warm calls; `cpu_emitters` as
  `TrainConfig.cpu_emitters` (`xla_cpu.compiler_options`)."""
  base = ModelConfig.smollm2_135m(num_layers=depth)
  tokens_NxT, old_logp_NxC, ref_logp_NxC, reward_N = _inputs(base)
  prompts_NxP, prompt_mask_NxP = tokens_NxT[:, :PROMPT_LEN], jnp.ones((ROWS, PROMPT_LEN), bool)
  sampling = SamplingConfig(num_samples=1, max_new_tokens=NEW_TOKENS, temperature=1.0, pad_id=0)
  key = jax.random.key(0)
  rows, warm_calls = {}, {}
  params_by_form = {}
  for form in order:
    cfg = base.replace(scan_layers=FORMS[form])
    graphdef, params = nnx.split(create_model(cfg, seed=0))
    params_by_form[form] = params
    row = {"depth": depth, "form": form}
    options = xla_cpu.program_options(cpu_emitters, scan_layers=FORMS[form], unroll_decode=False,
                                      platform=jax.default_backend())
    times, train = _timed_first(_train_fn(), params, graphdef, tokens_NxT, old_logp_NxC, ref_logp_NxC, reward_N,
                                compiler_options=options["train_step"])
    row["train"] = times
    calls = {"train": lambda train=train, params=params: train(params, tokens_NxT, old_logp_NxC, ref_logp_NxC,
                                                               reward_N)}
    if sampler:
      times, sample = _timed_first(_sample_fn(), graphdef, params, prompts_NxP, prompt_mask_NxP, key,
                                   config=sampling, compiler_options=options["rollout"])
      row["sample"] = times
      calls["sample"] = lambda sample=sample, params=params: sample(params, prompts_NxP, prompt_mask_NxP, key)
    rows[form], warm_calls[form] = row, calls
    print(json.dumps({k: v for k, v in row.items()}, default=lambda x: round(x, 3)), flush=True)
  # The same function in both forms (float32 summation order aside).
  loss = {form: float(warm_calls[form]["train"]()[0]) for form in order}
  assert abs(loss["scan"] - loss["unrolled"]) < 1e-4 * max(1.0, abs(loss["scan"])), loss
  for what in warm_calls[order[0]]:
    samples = {form: [] for form in order}
    for _ in range(reps):
      for form in order:
        t0 = time.perf_counter()
        jax.block_until_ready(warm_calls[form][what]())
        samples[form].append(time.perf_counter() - t0)
    for form in order:
      rows[form][what]["warm_s"] = float(np.median(samples[form]))
      rows[form][what]["warm_all_s"] = [round(x, 4) for x in samples[form]]
  del params_by_form, warm_calls
  gc.collect()
  return [rows[form] for form in ("scan", "unrolled")]


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"{jax.default_backend()} ({jax.device_count()} device(s)), {cpu}, {os.cpu_count()} cores, "
          f"load average {load:.1f} at start; jax {jax.__version__}")


def markdown(result: dict) -> str:
  lines = ["# First-step time against depth: layers under scan vs unrolled", "",
           f"{result['date']}, commit {result['commit']}, {result['machine']}.", "",
           f"Command: `{result['command']}`. SmolLM2-135M widths, random float32 weights; `train` = jitted forward + "
           f"backward of a GRPO-like loss on 8 x 48 tokens, `sample` = jitted `generate` of 8 rows x (32 + 16) "
           f"tokens. XLA:CPU emitters: `cpu_emitters={result.get('cpu_emitters', 'xla')}` (`tsallis_jax.xla_cpu`). "
           f"first = trace + compile + first run (fresh jit, caches cleared, no persistent cache); warm = "
           f"median (and fastest) of {result['reps']} interleaved calls. ratio = scan / unrolled.", "",
           "| depth | step | form | first s | (trace / compile / run) | warm s (fastest) | first ratio | warm ratio "
           "(fastest) |",
           "| ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
  for depth in result["depths"]:
    rows = {r["form"]: r for r in result["rows"] if r["depth"] == depth}
    for what in ("train", "sample"):
      if what not in rows["scan"]:
        continue
      for form in ("scan", "unrolled"):
        t = rows[form][what]
        ratio_first = rows["scan"][what]["first_s"] / rows["unrolled"][what]["first_s"]
        ratio_warm = rows["scan"][what]["warm_s"] / rows["unrolled"][what]["warm_s"]
        ratio_min = min(rows["scan"][what]["warm_all_s"]) / min(rows["unrolled"][what]["warm_all_s"])
        ratios = (f"{ratio_first:.2f} | {ratio_warm:.2f} ({ratio_min:.2f})" if form == "scan" else " | ")
        lines.append(f"| {depth} | {what} | {form} | {t['first_s']:.2f} | {t['lower_s']:.2f} / {t['compile_s']:.2f} "
                     f"/ {t['first_run_s']:.2f} | {t['warm_s']:.3f} ({min(t['warm_all_s']):.3f}) | {ratios} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depths", type=int, nargs="+", default=[2, 8, 30])
  p.add_argument("--reps", type=int, default=3, help="warm calls per form (median)")
  p.add_argument("--no-sampler", action="store_true", help="time only the train step")
  p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up compile of a tiny model")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--cpu-emitters", choices=xla_cpu.CPU_EMITTERS, default="xla",
                 help="compile the scanned form as TrainConfig.cpu_emitters would (default: XLA's default)")
  p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json in --out")
  args = p.parse_args(argv)
  name = "compile_depth" if args.cpu_emitters == "xla" else f"compile_depth_{args.cpu_emitters}"
  if args.render:
    result = json.loads((pathlib.Path(args.out) / f"{name}.json").read_text())
    (pathlib.Path(args.out) / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return
  jax.config.update("jax_enable_compilation_cache", False)  # every first call compiles for real
  result = {"benchmark": "compile_depth", "date": datetime.date.today().isoformat(), "commit": _commit(),
            "machine": _machine(), "command": " ".join(["python -m experiments.benchmarks.compile_depth",
                                                      *(sys.argv[1:] if argv is None else argv)]),
            "depths": args.depths, "reps": args.reps, "cpu_emitters": args.cpu_emitters, "rows": []}
  if not args.no_warmup:  # one-time process costs (backend start, first XLA compile) charged to neither form
    base = ModelConfig.tiny(vocab_size=256)
    for form in FORMS.values():
      graphdef, params = nnx.split(create_model(base.replace(scan_layers=form)))
      tokens_NxT, old_NxC, ref_NxC, reward_N = _inputs(base)
      _timed_first(_train_fn(), params, graphdef, tokens_NxT, old_NxC, ref_NxC, reward_N)
  for i, depth in enumerate(args.depths):
    order = ("scan", "unrolled") if i % 2 == 0 else ("unrolled", "scan")  # alternate which form goes first
    result["rows"] += measure_depth(depth, args.reps, not args.no_sampler, order, args.cpu_emitters)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / f"{name}.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
