"""The train step: one jitted, pure function `(state, batch, key, q_range) -> (state, metrics)` (STYLE.md point 4).

The batch holds the rollout (G sampled completions per prompt, from `rollout.py`) and the gold answers. One forward
pass of the current params scores either

* the teacher-forced sequences [prompt, rationale, `</think>`, gold answer] (GARL and PAFT with the paper's
  likelihood weights): log p(z|x) on the sampled rationale tokens and log w = log p(y*|x, z) on the gold answer,
  so the gradient includes the pathwise term (spec eq. 7, 12, 14; spec 2.2, 2.3), or
* the sampled sequences [prompt, rationale, `</think>`, sampled answer] (GRPO, spec 2.6, and GARL/PAFT with a 0/1
  verifier as weight): log p of every sampled token, with the exact-match reward.

The estimator (`garl_loss`, `paft_loss`, `grpo_loss` from `tsallis_jax.estimators`) turns these into a surrogate loss
whose gradient is the estimator; optax (global-norm clip, AdamW, warm-up schedule) applies it. q is evaluated from
the step inside jit (`schedules.q_schedule`), from a traced (q_start, q_end) pair, so runs that differ only in q share
one compiled step. The state is donated; shardings are explicit (`state.state_shardings`, batch over data x fsdp).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsallis_jax.estimators import SequenceLogProbs, garl_loss, grpo_loss, paft_loss
from tsallis_jax.model import make_attention_mask, make_positions
from tsallis_jax.model.logprobs import token_logprobs
from tsallis_jax.sampler import Rollout
from tsallis_jax.train import rollout as rollout_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.schedules import learning_rate_schedule, q_schedule_from_config
from tsallis_jax.train.state import TrainState, replicated

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The tokenizer's special ids the step needs (static)."""
  stop_ids: tuple[int, ...]
  pad_id: int
  close_tag_ids: tuple[int, ...]


def batch_sharding(mesh: Mesh, tree: Any) -> Any:
  """Leading (batch) dimension over data x fsdp for every array of rank >= 1; scalars replicated."""
  row = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  return jax.tree.map(lambda x: row if len(x.shape) else replicated(mesh), tree)


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def _sequences(cfg: TrainConfig, ids: TokenIds, rollout: Rollout, gold_NxA, gold_mask_NxA):
  """Tokens, pad mask and segment masks of the sequences this estimator scores (see the module docstring)."""
  teacher = cfg.estimator in ("garl", "paft") and cfg.weights == "likelihood"
  if teacher:
    comp_NxT, z_NxT, y_NxT, valid_NxT = rollout_lib.teacher_forced_completion(
        rollout, gold_NxA, gold_mask_NxA, ids.close_tag_ids, ids.stop_ids, ids.pad_id)
  else:
    comp_NxT, valid_NxT = rollout.tokens_NxT, rollout.mask_NxT
    z_NxT, y_NxT = rollout.mask_NxT & ~rollout.forced_mask_NxT, None
  tokens_NxS = jnp.concatenate([rollout.prompt_tokens_NxP, comp_NxT], axis=1)
  pad_NxS = jnp.concatenate([rollout.prompt_mask_NxP, valid_NxT], axis=1)
  return tokens_NxS, pad_NxS, z_NxT, y_NxT


def _completion_logprobs(model, tokens_NxS, pad_NxS, num_prompt: int, temperature: float, with_entropy: bool):
  logits_NxSxV, _ = model(tokens_NxS, make_positions(pad_NxS), make_attention_mask(pad_NxS))
  logp_NxS = token_logprobs(logits_NxSxV, tokens_NxS, temperature=temperature)
  logp_NxT = logp_NxS[:, num_prompt:]
  if not with_entropy:
    return logp_NxT, None
  # Entropy of the next-token distribution that produced each completion token (position t-1 predicts t).
  logits_NxTxV = jax.lax.stop_gradient(logits_NxSxV[:, num_prompt - 1:-1]).astype(jnp.float32) / temperature
  logq_NxTxV = jax.nn.log_softmax(logits_NxTxV, axis=-1)
  entropy_NxT = -jnp.sum(jnp.exp(logq_NxTxV) * logq_NxTxV, axis=-1)
  return logp_NxT, entropy_NxT


def loss_and_metrics(params, ref_params, graphdef, cfg: TrainConfig, ids: TokenIds, batch: dict, key, q):
  """The estimator's surrogate loss and its metrics (everything but the optimizer)."""
  rollout: Rollout = batch["rollout"]
  G = cfg.num_samples
  N, T = rollout.tokens_NxT.shape
  B = N // G
  P = rollout.prompt_tokens_NxP.shape[1]
  gold_NxA = jnp.repeat(batch["answer_tokens_BxA"], G, axis=0)
  gold_mask_NxA = jnp.repeat(batch["answer_mask_BxA"], G, axis=0)
  reward_N = rollout_lib.exact_match_reward(rollout, gold_NxA, gold_mask_NxA)
  reward_BxG = reward_N.reshape(B, G)
  tokens_NxS, pad_NxS, z_NxT, y_NxT = _sequences(cfg, ids, rollout, gold_NxA, gold_mask_NxA)

  ref_logp_NxT = None
  if ref_params is not None:
    ref_model = nnx.merge(graphdef, ref_params)
    ref_logp_NxT, _ = _completion_logprobs(ref_model, tokens_NxS, pad_NxS, P, cfg.temperature, False)
    ref_logp_NxT = jax.lax.stop_gradient(ref_logp_NxT)

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    logp_NxT, entropy_NxT = _completion_logprobs(model, tokens_NxS, pad_NxS, P, cfg.temperature, True)
    aux = {"policy/entropy": _masked_mean(entropy_NxT, z_NxT),
           "mismatch/logp_abs_diff": _masked_mean(jnp.abs(jax.lax.stop_gradient(logp_NxT)
                                                          - rollout.model_logp_NxT), z_NxT)}
    kl_NxT = None
    if ref_logp_NxT is not None:
      delta_NxT = ref_logp_NxT - logp_NxT
      kl_NxT = jnp.exp(delta_NxT) - delta_NxT - 1.0  # k3 estimate of KL(pi || pi_init) per sampled token
      aux["kl/ref"] = jax.lax.stop_gradient(_masked_mean(kl_NxT, z_NxT))
    if cfg.estimator == "grpo":
      seq = SequenceLogProbs(
          logp_z_BxGxT=logp_NxT.reshape(B, G, T), mask_z_BxGxT=z_NxT.reshape(B, G, T),
          ref_logp_z_BxGxT=None if ref_logp_NxT is None or cfg.kl_coef == 0 else ref_logp_NxT.reshape(B, G, T))
      loss, est = grpo_loss(seq, reward_BxG, scale_rewards=cfg.grpo_scale_rewards, epsilon=cfg.grpo_clip_eps,
                            beta=cfg.kl_coef)
      est = {k: v for k, v in est.items() if k != "kl/ref" or ref_logp_NxT is None}
      return loss, {**aux, **est}
    logp_z_BxG = jnp.sum(jnp.where(z_NxT, logp_NxT, 0.0), axis=1).reshape(B, G)
    if cfg.weights == "likelihood":
      logw_BxG = jnp.sum(jnp.where(y_NxT, logp_NxT, 0.0), axis=1).reshape(B, G)
    else:
      logw_BxG = jnp.where(reward_BxG > 0, 0.0, -jnp.inf)
    if cfg.estimator == "garl":
      loss, est = garl_loss(logp_z_BxG, logw_BxG, q=q, baseline=cfg.baseline, normalize_by_Mq=cfg.normalize_mq)
    else:
      keys_B = jax.random.split(key, B)
      loss, est = paft_loss(logp_z_BxG, logw_BxG, keys_B, q=q, num_resamples=cfg.resamples,
                            normalize_by_Mq=cfg.normalize_mq)
    if cfg.kl_coef > 0:
      loss = loss + cfg.kl_coef * _masked_mean(kl_NxT, z_NxT)
    return loss, {**aux, **est}

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  std_B = jnp.std(reward_BxG, axis=1)
  completion_len_N = rollout.lengths_N.astype(jnp.float32)
  metrics = {
    "loss": loss,
    "jq/q": jnp.asarray(q, jnp.float32),
    "reward/mean": jnp.mean(reward_BxG),
    "reward/std": jnp.std(reward_BxG),
    "groups/frac_zero_std": jnp.mean((std_B <= 0).astype(jnp.float32)),
    "groups/frac_all_wrong": jnp.mean(jnp.all(reward_BxG <= 0, axis=1).astype(jnp.float32)),
    "groups/frac_all_correct": jnp.mean(jnp.all(reward_BxG >= 1, axis=1).astype(jnp.float32)),
    "gen/len_mean": jnp.mean(completion_len_N),
    "gen/len_max": jnp.max(completion_len_N),
    "gen/rationale_len_mean": jnp.mean(jnp.sum(rollout.rationale_mask_NxT, axis=1).astype(jnp.float32)),
    "gen/answer_len_mean": jnp.mean(jnp.sum(rollout.answer_mask_NxT, axis=1).astype(jnp.float32)),
    "gen/truncated_frac": jnp.mean(rollout.truncated_N.astype(jnp.float32)),
    "gen/forced_frac": jnp.mean(rollout.forced_N.astype(jnp.float32)),
    "gen/tokens": jnp.sum(completion_len_N),
    **{k: v for k, v in aux.items() if k not in ("jq/q", "reward/mean", "reward/std")},
  }
  return grads, metrics


def make_train_step(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, ids: TokenIds,
                    mesh: Mesh, state_sh: TrainState, abstract_batch: Any) -> Callable:
  """The jitted step `(state, batch, key, q_range) -> (state, metrics)`; `q_range` = float32 (q_start, q_end)."""
  lr_fn = learning_rate_schedule(cfg)

  def step_fn(state: TrainState, batch: dict, key: jax.Array, q_range: jax.Array):
    q = q_schedule_from_config(cfg, q_range[0], q_range[1])(state.step)
    grads, metrics = loss_and_metrics(state.params, state.ref_params, graphdef, cfg, ids, batch, key, q)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["update_norm"] = optax.tree.norm(updates)
    metrics["learning_rate"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  rep = replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sharding(mesh, abstract_batch), rep, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))

  def run(state, batch, key, q_range):
    with jax.set_mesh(mesh):
      return jitted(state, batch, key, q_range)

  run.jitted = jitted
  return run
