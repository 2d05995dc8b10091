"""This project's GRPO / GARL / PAFT training step on a benchmark workload (runs in the project venv).

  python -m experiments.benchmarks.ours_grpo --workload DIR --mode grpo|garl|paft [--steps N]

(The sampler alone is timed by `sampler_ours.py`.)

A step is what `tsallis_jax.train.train_and_evaluate` runs per step, with the trainer's own pieces:

  rollout   `tsallis_jax.sampler.generate_impl` jitted (prefill each prompt once, repeat its KV cache G times,
            `lax.while_loop` decode), G samples per prompt, temperature 1, stop at `<eos>`; the workload has no
            `</think>` (its completion is all "rationale": z = every sampled token)
  reward    on the host through the trainer's reward interface (`tsallis_jax.train.scoring.rollout_rewards`): the
            completions decoded, the peers' reward function `(completions, records) -> list[float]` (1.0 when the
            completion's words contain the reward token, `peers.common.reward_contains`), `rewards_BxG` put on the
            mesh
  update    the trainer's jitted step (`tsallis_jax.train.step.make_train_step`, state donated; as the trainer's
            default, each prompt's forward and backward run once for its G samples, `share_prompt_forward`;
            `--no-share-prompt` runs every full sequence, the ablation): reference forward
            (beta > 0), policy forward + backward of `grpo_loss` (PPO-clip 0.2, group-std advantages, token mean
            per sequence; k3 KL with beta) or `garl_loss` (RLOO, 1/M^q) / `paft_loss` (K = M) at q = 0.75 with
            weights="reward" (the 0/1 verifier as weight), the entropy / mismatch / KL metrics every run logs, and
            optax (global-norm clip 1.0, AdamW: lr from the workload, betas 0.9/0.999, eps 1e-8, no decay)

Each phase is waited for, so every step's time splits into `rollout`, `reward` and `update` (`phases_median_s`).
As the trainer's first step, step 0 starts compiling the update in a background thread before its rollout
(`tsallis_jax.train.compile_ahead`; `--no-compile-ahead` compiles it at the first update, the ablation); the
compile is inside step 0's time either way.

Host allocator: `main` calls `tsallis_jax.host_memory.keep_freed_memory()` first, as the training command line
does, so the step's scratch memory stays mapped between steps (no page faults per step).

Compilation cache: as the trainer (`TrainConfig.compile_cache`), the runner turns on JAX's persistent compilation
cache, in `--compile-cache DIR` (the benchmark gives every cold run a fresh empty folder, so its first step compiles
and writes the cache, as a user's first run does). `--warm-compile-cache` first runs two untimed steps in a child
process with the same folder, then the timed run: the first step of a re-run of the same config
(mode `grpo_rerun` of `run.py`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import workloads
from experiments.benchmarks.peers import common
from tsallis_jax import distributed, host_memory, xla_cpu
from tsallis_jax.data.records import Record
from tsallis_jax.model import hf_io
from tsallis_jax.sampler import SamplingConfig, generate_impl
from tsallis_jax.train import compile_cache, scoring
from tsallis_jax.train import state as state_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.schedules import make_optimizer
from tsallis_jax.train.step import TokenIds, make_train_step

ESTIMATORS = ("grpo", "garl", "paft")
UPDATE_PHASE = "update (trainer step: ref fwd + policy fwd/bwd + AdamW)"
REWARD_PHASE = "reward (host: decode + reward_funcs)"


def train_config(spec: workloads.WorkloadSpec, mode: str, q: float, beta: float,
                 share_prompt: bool = True, cpu_emitters: str = "auto") -> TrainConfig:
  """The trainer's config for the workload's step (the peers' GRPO settings; TRL / tunix names in comments)."""
  return TrainConfig(share_prompt_forward=share_prompt, cpu_emitters=cpu_emitters,
      name=f"bench-{spec.name}-{mode}", estimator=mode, q=q if mode != "grpo" else 0.0, weights="reward",
      baseline="rloo", num_samples=spec.group_size, batch_size=spec.num_prompts, eval_batch_size=spec.num_prompts,
      max_prompt_len=spec.prompt_len, rationale_budget=spec.max_new, max_answer_len=1, temperature=1.0,
      learning_rate=spec.learning_rate, grad_clip=1.0, kl_coef=beta, log_ref_kl=beta > 0, grpo_loss_type="grpo",
      grpo_scale_rewards="group", grpo_clip_eps=0.2, progress_bar="off", tensorboard=False)


def load_workload(folder: str, scan_layers: bool = False):
  """(spec, model, tokenizer, prompt_tokens_BxP, prompt_mask_BxP) of a built workload (float32); `scan_layers`:
  the model's layers stacked under one scan (`ModelConfig.scan_layers`) instead of the default unrolled form."""
  spec = workloads.read_spec(folder)
  model = hf_io.load_hf_checkpoint(folder, dtype="float32", param_dtype="float32", scan_layers=scan_layers)
  from transformers import PreTrainedTokenizerFast
  tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
  prompts, _ = workloads.read_prompts(folder)
  ids = tokenizer(prompts[:spec.num_prompts], add_special_tokens=False)["input_ids"]
  if any(len(row) != spec.prompt_len for row in ids):
    raise ValueError(f"{folder}: every prompt must tokenize to {spec.prompt_len} tokens; rebuild the workload.")
  prompt_tokens_BxP = np.asarray(ids, np.int32)
  return spec, model, tokenizer, prompt_tokens_BxP, np.ones_like(prompt_tokens_BxP, bool)


def sanity_logits(model) -> np.ndarray:
  n = len(common.SANITY_IDS)
  logits, _ = model(jnp.asarray([common.SANITY_IDS], jnp.int32), jnp.arange(n)[None],
                    jnp.tril(jnp.ones((1, n, n), bool)))
  return np.asarray(logits[0, -1, :5])


def sampling_config(spec: workloads.WorkloadSpec, num_samples: int, unroll_layers: bool = False) -> SamplingConfig:
  return SamplingConfig(num_samples=num_samples, max_new_tokens=spec.max_new, temperature=1.0,
                        stop_ids=(spec.eos_id,), pad_id=spec.pad_id, unroll_layers=unroll_layers)


@dataclasses.dataclass
class Built:
  """The pieces of one benchmark step (what `run_train` times; `gemm_ceiling.py` reads the step's matmuls)."""
  spec: workloads.WorkloadSpec
  cfg: TrainConfig
  tokenizer: Any
  sanity: np.ndarray
  mesh: Any
  state: state_lib.TrainState
  rollout_fn: Callable
  prompts: tuple[jax.Array, jax.Array]
  answers: dict[str, jax.Array]
  abstract_batch: dict[str, Any]
  train_step: Callable


def build(folder: str, mode: str, q: float = 0.75, beta: float | None = None, seed: int = 0,
          share_prompt: bool = True, scan_layers: bool = False, unroll_decode: bool = False,
          cpu_emitters: str = "auto") -> Built:
  """Loads the workload and builds the trainer's state, jitted rollout and train step for it (nothing compiled);
  `share_prompt=False` is the ablation of `TrainConfig.share_prompt_forward`, `scan_layers=True` the layers-under-
  scan form of the model (`ModelConfig.scan_layers`: compile time flat in depth), which decodes with its layers
  unrolled with `unroll_decode=True` (`SamplingConfig.unroll_layers`); both programs get the trainer's XLA:CPU
  compile options for `cpu_emitters` (`TrainConfig.cpu_emitters`, `tsallis_jax.xla_cpu`)."""
  if mode not in ESTIMATORS:
    raise ValueError(f"mode={mode!r}; choose one of {ESTIMATORS}.")
  spec, model, tokenizer, prompt_tokens_BxP, prompt_mask_BxP = load_workload(folder, scan_layers)
  beta = spec.beta if beta is None else beta
  cfg = train_config(spec, mode, q, beta, share_prompt, cpu_emitters)
  sanity = sanity_logits(model)
  # The eager sanity forward leaves ~100 one-op executables in JAX's caches (0.1 GB on smollm2), which the trainer
  # never builds: dropped before anything the trainer does is compiled.
  jax.clear_caches()
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  graphdef, abstract_vars = nnx.split(model)
  with_ref = beta > 0
  tx = make_optimizer(cfg)
  state_sh = state_lib.state_shardings(abstract_vars, tx, mesh, model.config.sharding_rules, with_ref)
  # as the trainer (loop.py): the loaded weights are donated to the state, not copied twice
  state = state_lib.init_state(state_lib.pure(abstract_vars), tx, seed, state_sh, with_ref, donate=True)
  del model, abstract_vars
  sampling = sampling_config(spec, spec.group_size, unroll_decode)
  options = xla_cpu.program_options(cpu_emitters, scan_layers=scan_layers, unroll_decode=unroll_decode,
                                    platform=xla_cpu.platform_of(mesh))  # as `train.programs.build_programs`
  rollout_fn = jax.jit(lambda params, tokens, mask, key: generate_impl(graphdef, params, tokens, mask, key, sampling),
                       compiler_options=options["rollout"])
  prompts = (jnp.asarray(prompt_tokens_BxP), jnp.asarray(prompt_mask_BxP))
  B = spec.num_prompts
  answers = {"answer_tokens_BxA": jnp.full((B, 1), spec.pad_id, jnp.int32), "answer_mask_BxA": jnp.zeros((B, 1), bool)}
  abstract_rollout = jax.eval_shape(rollout_fn, state.params, *prompts, jax.random.key(0))
  abstract_batch = {"rollout": abstract_rollout, **jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                answers),
                    "rewards_BxG": jax.ShapeDtypeStruct((B, spec.group_size), jnp.float32)}
  ids = TokenIds(stop_ids=(spec.eos_id,), pad_id=spec.pad_id, close_tag_ids=())
  train_step = make_train_step(cfg, graphdef, tx, ids, mesh, state_sh, abstract_batch,
                               compiler_options=options["train_step"])
  return Built(spec, cfg, tokenizer, sanity, mesh, state, rollout_fn, prompts, answers, abstract_batch, train_step)


def host_rewards(spec: workloads.WorkloadSpec, folder: str) -> tuple[scoring.RewardFuncs, list[Record]]:
  """The step's reward through the trainer's interface: the peers' function (1.0 when the completion contains the
  workload's reward token) as `reward_funcs`, and a record per prompt of the batch."""
  reward_token = spec.reward_token
  contains = lambda completions, records, **columns: common.reward_contains(reward_token, completions)  # noqa: E731
  records = [Record(id=f"bench-{i}", question=text, answer="", source=folder, index=i)
             for i, text in enumerate(workloads.read_prompts(folder)[0][:spec.num_prompts])]
  return scoring.RewardFuncs((contains,), (1.0,)), records


def run_train(folder: str, mode: str, steps: int = 0, q: float = 0.75, beta: float | None = None,
              seed: int = 0, compile_cache_dir: str = "", share_prompt: bool = True,
              compile_ahead: bool = True, scan_layers: bool = False, unroll_decode: bool = False,
              cpu_emitters: str = "auto") -> dict[str, Any]:
  """Times `steps` trainer steps (step 0 = compile) and emits the BENCH_RESULT line; returns the result dict.
  `compile_ahead=False` compiles the update at its first call, after the rollout (`train.compile_ahead`);
  `scan_layers=True` runs the model's layers under scan (`ModelConfig.scan_layers`), its rollout unrolled with
  `unroll_decode=True`; `cpu_emitters` is `TrainConfig.cpu_emitters`."""
  cache_entries = len(os.listdir(compile_cache_dir)) if compile_cache_dir and os.path.isdir(compile_cache_dir) else 0
  compile_cache.enable(compile_cache_dir)
  built = build(folder, mode, q, beta, seed, share_prompt, scan_layers, unroll_decode, cpu_emitters)
  spec, cfg, tokenizer, mesh, state = built.spec, built.cfg, built.tokenizer, built.mesh, built.state
  rollout_fn, prompts, answers, train_step = built.rollout_fn, built.prompts, built.answers, built.train_step
  steps = steps or spec.grpo_steps
  B = spec.num_prompts
  reward_funcs, records = host_rewards(spec, folder)
  q_range = jnp.asarray([cfg.q, cfg.q], jnp.float32)
  key = jax.random.key(seed)
  times, rewards, phases = [], [], {"rollout": [], REWARD_PHASE: [], UPDATE_PHASE: []}
  for i in range(steps):
    rollout_key, step_key = jax.random.split(jax.random.fold_in(key, i))
    t0 = time.perf_counter()
    if i == 0 and compile_ahead:  # as the trainer's first step (loop.py): the update compiles beside the rollout
      train_step.compile_ahead(state, built.abstract_batch, step_key, q_range)
    rollout = jax.block_until_ready(rollout_fn(state.params, *prompts, rollout_key))
    t1 = time.perf_counter()
    rewards_BxG = jax.block_until_ready(scoring.rollout_rewards(reward_funcs, rollout, records, tokenizer, mesh, B))
    t2 = time.perf_counter()
    state, metrics = train_step(state, {"rollout": rollout, **answers, "rewards_BxG": rewards_BxG},
                                step_key, q_range)
    jax.block_until_ready(state.params)
    t3 = time.perf_counter()
    times.append(t3 - t0)
    phases["rollout"].append(t1 - t0)
    phases[REWARD_PHASE].append(t2 - t1)
    phases[UPDATE_PHASE].append(t3 - t2)
    rewards.append(metrics["reward/mean"])  # fetched after the loop
  rewards = [float(r) * spec.num_sequences for r in jax.device_get(rewards)]
  return common.emit(system="ours", version=version(), spec=spec.to_json(), mode=mode, times_s=times,
                     tokens_per_step=spec.generated_slots, phases=phases, sanity=built.sanity,
                     extra={"beta": cfg.kl_coef, "q": cfg.q, "rewards_per_step": rewards,
                            "share_prompt_forward": cfg.share_prompt_forward, "compile_ahead": compile_ahead,
                            "scan_layers": scan_layers, "unroll_decode": unroll_decode, "cpu_emitters": cpu_emitters,
                            "compile_cache": {"dir": compile_cache_dir, "entries_before": cache_entries},
                            "step": "jit(sampler.generate_impl), host rewards (train.scoring), then the trainer's "
                                    "jitted step (train.step.make_train_step)"})


def version() -> str:
  import flax
  return f"tsallis_jax (this repo), jax {jax.__version__}, flax {flax.__version__}"


def main(argv=None):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  argv = sys.argv[1:] if argv is None else list(argv)
  # As `python -m experiments.train` does, before the backend starts (`--no-host-allocator`: the ablation).
  allocator = {} if "--no-host-allocator" in argv else host_memory.keep_freed_memory()
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True)
  p.add_argument("--mode", choices=ESTIMATORS, default="grpo")
  p.add_argument("--steps", type=int, default=0)
  p.add_argument("--q", type=float, default=0.75)
  p.add_argument("--beta", type=float, default=None)
  p.add_argument("--compile-cache", default="", help="JAX persistent compilation cache folder ('' = none)")
  p.add_argument("--warm-compile-cache", action="store_true",
                 help="fill --compile-cache with two untimed steps in a child process first (a re-run's first step)")
  p.add_argument("--no-host-allocator", action="store_true",
                 help="ablation (cpu_paths.py): leave glibc's allocator as it is (host_memory.keep_freed_memory)")
  p.add_argument("--no-share-prompt", action="store_true",
                 help="ablation (run.py mode grpo_full_prompt): share_prompt_forward=False, every full sequence "
                      "through the forward and backward passes")
  p.add_argument("--scan-layers", action="store_true",
                 help="run.py mode grpo_scan: the model's layers stacked under one scan (ModelConfig.scan_layers; "
                      "compile time flat in depth) instead of the default unrolled form")
  p.add_argument("--unroll-decode", action="store_true",
                 help="with --scan-layers, the rollout decodes with the layers unrolled (SamplingConfig.unroll_layers;"
                      " the decode_layers.py A/B) instead of under the scan")
  p.add_argument("--no-compile-ahead", action="store_true",
                 help="ablation: compile the update at its first call instead of beside the first rollout "
                      "(train.compile_ahead)")
  p.add_argument("--no-cpu-linear-backward", action="store_true",
                 help="ablation (cpu_paths.py): autodiff's backward for every projection (transformer.linear)")
  p.add_argument("--cpu-emitters", choices=xla_cpu.CPU_EMITTERS, default="auto",
                 help="TrainConfig.cpu_emitters (tsallis_jax.xla_cpu): XLA:CPU's emitters for programs under scan; "
                      "'xla' is cpu_paths.py's ablation")
  args = p.parse_args(argv)
  if args.no_cpu_linear_backward:
    from tsallis_jax.model import transformer
    transformer._transpose_input_for_grad = lambda rows, d, f: False
  if args.warm_compile_cache:
    if not args.compile_cache:
      p.error("--warm-compile-cache needs --compile-cache DIR")
    import subprocess
    # The child runs this same command line (every flag that changes what is compiled reaches it), two steps long.
    subprocess.run([sys.executable, "-m", "experiments.benchmarks.ours_grpo",
                    *[a for a in argv if a != "--warm-compile-cache"], "--steps", "2"],
                   check=True, stdout=subprocess.DEVNULL)
  print("ours runner:", version(), "devices", jax.devices(), "host allocator", allocator, flush=True)
  run_train(args.workload, args.mode, args.steps, q=args.q, beta=args.beta, compile_cache_dir=args.compile_cache,
            share_prompt=not args.no_share_prompt, compile_ahead=not args.no_compile_ahead,
            scan_layers=args.scan_layers, unroll_decode=args.unroll_decode, cpu_emitters=args.cpu_emitters)


if __name__ == "__main__":
  main(sys.argv[1:])
