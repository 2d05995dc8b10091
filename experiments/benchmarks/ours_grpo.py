"""This project's GRPO / GARL / PAFT step on a benchmark workload (runs in the project venv).

  python -m experiments.benchmarks.ours_grpo --workload DIR --mode grpo|garl|paft [--steps N] [--fused]

(The sampler alone is timed by `sampler_ours.py`.)

The step is composed from the library's public pieces, jitted, with params and optimizer state donated:

  rollout   `tsallis_jax.sampler.generate_impl` (prefill each prompt once, repeat its KV cache G times,
            `lax.while_loop` decode), G samples per prompt, temperature 1, stop at `<eos>`
  reward    1.0 when the completion contains the reward token (on device: the word-level tokenizer maps the reward
            word to one id, so this equals the peers' string test)
  log-probs one float32 policy forward over [prompt, completion] (`Transformer.hidden`, the LM head applied only at
            completion positions) and, with beta > 0, one reference forward under stop-gradient
  loss      `grpo_loss` (PPO-clip 0.2, advantages scaled by the group std, ddof 1, eps 1e-4, token mean per
            sequence then mean over sequences, k3 KL with beta) or `garl_loss` (RLOO, 1/M^q) / `paft_loss`
            (K = M resamples) at q = 0.75 on the same sequences with the same k3 KL term, so the three steps do
            the same work except for the estimator
  update    optax: global-norm clip 1.0, AdamW (lr from the workload, betas 0.9/0.999, eps 1e-8, no decay)

Why not the trainer's step (`tsallis_jax.train.step`)? It scores [prompt, rationale, </think>, answer] sequences
against gold answers (the paper's tasks); this benchmark's reward is "contains a token", the peers' reference task.
The pieces above are exactly what that step calls (sampler, model log-probs, estimator losses, optax).

By default the step is two jitted calls, the rollout, then the update (log-probs + loss + AdamW in one jit),
waited for one after the other so every step's time splits into `rollout` and `update` (`phases_median_s`);
`--fused` puts both in one jit instead (no per-phase times).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.benchmarks import workloads
from experiments.benchmarks.peers import common
from tsallis_jax.estimators import SequenceLogProbs, garl_loss, grpo_loss, paft_loss
from tsallis_jax.model import hf_io, make_attention_mask, make_positions
from tsallis_jax.sampler import SamplingConfig, generate_impl

ESTIMATORS = ("grpo", "garl", "paft")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the benchmark step (hashable: one compiled step per config)."""
  estimator: str
  q: float
  beta: float
  reward_id: int
  sampling: SamplingConfig
  epsilon: float = 0.2
  std_eps: float = 1e-4

  def __post_init__(self):
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator={self.estimator!r}; choose one of {ESTIMATORS}.")
    if not 0.0 <= self.q <= 1.0:
      raise ValueError(f"q={self.q} must lie in [0, 1].")
    if self.beta < 0:
      raise ValueError(f"beta={self.beta} must be >= 0 (0 skips the reference forward).")


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """Global-norm clip 1.0 then AdamW, as both peers are configured (workloads.WorkloadSpec)."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))


def completion_logprobs(model, tokens_NxS: jax.Array, pad_NxS: jax.Array, num_prompt: int) -> jax.Array:
  """float32 log p of each completion token (positions num_prompt..S-1); the LM head runs only where needed."""
  hidden_NxSxD, _ = model.hidden(tokens_NxS, make_positions(pad_NxS), make_attention_mask(pad_NxS))
  logits_NxTxV = model.logits(hidden_NxSxD[:, num_prompt - 1:-1])
  completion_NxT = tokens_NxS[:, num_prompt:]
  picked_NxT = jnp.take_along_axis(logits_NxTxV, completion_NxT[:, :, None], axis=-1)[:, :, 0]
  return picked_NxT - jax.nn.logsumexp(logits_NxTxV, axis=-1)


def rollout_and_rewards(graphdef, params, prompt_tokens_BxP, prompt_mask_BxP, key, cfg: StepConfig):
  """G samples per prompt, the scored sequences and their 0/1 rewards (row b*G + g is sample g of prompt b)."""
  rollout = generate_impl(graphdef, params, prompt_tokens_BxP, prompt_mask_BxP, key, cfg.sampling)
  G = cfg.sampling.num_samples
  tokens_NxS = jnp.concatenate([rollout.prompt_tokens_NxP, rollout.tokens_NxT], axis=1)
  pad_NxS = jnp.concatenate([rollout.prompt_mask_NxP, rollout.mask_NxT], axis=1)
  hit_N = jnp.any((rollout.tokens_NxT == cfg.reward_id) & rollout.mask_NxT, axis=-1)
  rewards_BxG = hit_N.astype(jnp.float32).reshape(-1, G)
  return tokens_NxS, pad_NxS, rollout.mask_NxT, rewards_BxG


def update(graphdef, tx, cfg: StepConfig, params, opt_state, ref_params, tokens_NxS, pad_NxS, mask_NxT,
           rewards_BxG, key):
  """Reference forward (beta > 0), policy forward + backward of the estimator's surrogate loss, one AdamW update."""
  B, G = rewards_BxG.shape
  P = tokens_NxS.shape[1] - mask_NxT.shape[1]
  to_BxGxT = lambda x_NxT: x_NxT.reshape(B, G, -1)
  mask_BxGxT = to_BxGxT(mask_NxT)
  ref_BxGxT = None
  if cfg.beta > 0:
    ref_model = nnx.merge(graphdef, ref_params)
    ref_BxGxT = jax.lax.stop_gradient(to_BxGxT(completion_logprobs(ref_model, tokens_NxS, pad_NxS, P)))

  def loss_fn(p):
    logp_BxGxT = to_BxGxT(completion_logprobs(nnx.merge(graphdef, p), tokens_NxS, pad_NxS, P))
    seq = SequenceLogProbs(logp_z_BxGxT=logp_BxGxT, mask_z_BxGxT=mask_BxGxT, ref_logp_z_BxGxT=ref_BxGxT)
    if cfg.estimator == "grpo":
      return grpo_loss(seq, rewards_BxG, loss_type="grpo", scale_rewards="group", epsilon=cfg.epsilon,
                       beta=cfg.beta, std_eps=cfg.std_eps, std_ddof=1)
    logp_z_BxG = seq.sequence_logp_z()
    logw_BxG = jnp.where(rewards_BxG > 0, 0.0, -jnp.inf)  # 0/1 verifier: log w in {0, -inf}
    if cfg.estimator == "garl":
      loss, aux = garl_loss(logp_z_BxG, logw_BxG, q=cfg.q, baseline="rloo")
    else:
      loss, aux = paft_loss(logp_z_BxG, logw_BxG, key, q=cfg.q)
    if cfg.beta > 0:  # the same k3 KL term as GRPO's (token mean per sequence, mean over sequences)
      mask = mask_BxGxT.astype(jnp.float32)
      diff = jnp.where(mask > 0, ref_BxGxT - logp_BxGxT, 0.0)
      kl_BxG = jnp.sum((jnp.exp(diff) - diff - 1.0) * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
      loss = loss + cfg.beta * jnp.mean(kl_BxG)
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": loss, "reward/mean": jnp.mean(rewards_BxG), "grad_norm": optax.tree.norm(grads)}
  return params, opt_state, metrics


UPDATE_PHASE = "update (ref fwd + policy fwd/bwd + AdamW)"


def make_step(graphdef, tx, cfg: StepConfig, *, fused: bool = False):
  """The step as `step(params, opt_state, ref_params, prompt_tokens_BxP, prompt_mask_BxP, key)`.

  fused=False (default): two jitted calls, `rollout(params, prompts, key) -> batch` and
  `update(params, opt_state, ref_params, *batch, key) -> (params, opt_state, metrics)` (params and optimizer state
  donated), returned as a pair so the caller can time each phase. fused=True: one jitted function doing both.
  """
  if not fused:
    rollout_fn = jax.jit(functools.partial(rollout_and_rewards, graphdef, cfg=cfg))
    update_fn = jax.jit(functools.partial(update, graphdef, tx, cfg), donate_argnums=(0, 1))
    return rollout_fn, update_fn

  def step(params, opt_state, ref_params, prompt_tokens_BxP, prompt_mask_BxP, key):
    key_sample, key_resample = jax.random.split(key)
    tokens_NxS, pad_NxS, mask_NxT, rewards_BxG = rollout_and_rewards(
      graphdef, params, prompt_tokens_BxP, prompt_mask_BxP, key_sample, cfg)
    return update(graphdef, tx, cfg, params, opt_state, ref_params, tokens_NxS, pad_NxS, mask_NxT, rewards_BxG,
                  key_resample)

  return jax.jit(step, donate_argnums=(0, 1))


def load_workload(folder: str):
  """(spec, model, tokenizer, prompt_tokens_BxP, prompt_mask_BxP) of a built workload (float32)."""
  spec = workloads.read_spec(folder)
  model = hf_io.load_hf_checkpoint(folder, dtype="float32", param_dtype="float32")
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


def sampling_config(spec: workloads.WorkloadSpec, num_samples: int) -> SamplingConfig:
  return SamplingConfig(num_samples=num_samples, max_new_tokens=spec.max_new, temperature=1.0,
                        stop_ids=(spec.eos_id,), pad_id=spec.pad_id)


def run_train(folder: str, mode: str, steps: int = 0, q: float = 0.75, beta: float | None = None,
              fused: bool = False, seed: int = 0) -> dict[str, Any]:
  """Times `steps` steps (step 0 = compile) and emits the BENCH_RESULT line; returns the result dict.

  Unfused (default), each step is the rollout call then the update call, each waited for, so the per-phase times
  of every step come for free (the wait between them costs well under a millisecond).
  """
  spec, model, tokenizer, prompt_tokens_BxP, prompt_mask_BxP = load_workload(folder)
  steps = steps or spec.grpo_steps
  beta = spec.beta if beta is None else beta
  reward_id = tokenizer.convert_tokens_to_ids(spec.reward_token)
  cfg = StepConfig(estimator=mode, q=q if mode != "grpo" else 0.0, beta=beta, reward_id=int(reward_id),
                   sampling=sampling_config(spec, spec.group_size))
  sanity = sanity_logits(model)
  graphdef, params = nnx.split(model)
  ref_params = jax.tree.map(jnp.copy, params) if beta > 0 else None
  tx = make_optimizer(spec.learning_rate)
  opt_state = tx.init(params)
  step = make_step(graphdef, tx, cfg, fused=fused)
  key = jax.random.key(seed)
  prompts = (jnp.asarray(prompt_tokens_BxP), jnp.asarray(prompt_mask_BxP))
  times, rewards, phases = [], [], {"rollout": [], UPDATE_PHASE: []}
  for i in range(steps):
    key_sample, key_resample = jax.random.split(jax.random.fold_in(key, i))
    t0 = time.perf_counter()
    if fused:
      params, opt_state, metrics = step(params, opt_state, ref_params, *prompts, jax.random.fold_in(key, i))
    else:
      rollout_fn, update_fn = step
      batch = jax.block_until_ready(rollout_fn(params, *prompts, key_sample))
      phases["rollout"].append(time.perf_counter() - t0)
      params, opt_state, metrics = update_fn(params, opt_state, ref_params, *batch, key_resample)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
    if not fused:
      phases[UPDATE_PHASE].append(times[-1] - phases["rollout"][-1])
    rewards.append(metrics["reward/mean"])  # fetched after the loop: no host sync inside it
  rewards = [float(r) * spec.num_sequences for r in jax.device_get(rewards)]
  return common.emit(system="ours", version=version(), spec=spec.to_json(), mode=mode, times_s=times,
                     tokens_per_step=spec.generated_slots, phases=phases if not fused else None, sanity=sanity,
                     extra={"beta": beta, "q": cfg.q, "rewards_per_step": rewards, "fused": fused,
                            "step": "jit(sampler.generate_impl + reward) then jit(log-probs + estimator loss + "
                                    "AdamW)" if not fused else "one jit: rollout + log-probs + loss + AdamW"})


def version() -> str:
  import flax
  return f"tsallis_jax (this repo), jax {jax.__version__}, flax {flax.__version__}"


def main(argv=None):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True)
  p.add_argument("--mode", choices=ESTIMATORS, default="grpo")
  p.add_argument("--steps", type=int, default=0)
  p.add_argument("--q", type=float, default=0.75)
  p.add_argument("--beta", type=float, default=None)
  p.add_argument("--fused", action="store_true", help="rollout and update in one jit (no per-phase times)")
  args = p.parse_args(argv)
  print("ours runner:", version(), "devices", jax.devices(), flush=True)
  run_train(args.workload, args.mode, args.steps, q=args.q, beta=args.beta, fused=args.fused)


if __name__ == "__main__":
  main(sys.argv[1:])
