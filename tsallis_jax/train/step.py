"""The train step: one jitted, pure function `(state, batch, key, q_range) -> (state, metrics)` (STYLE.md point 4).

The batch holds the rollout (G sampled completions per prompt, from the sampler) and the gold answers. One forward
pass of the current params scores either

* the teacher-forced sequences [prompt, rationale, `</think>`, gold answer] (GARL and PAFT with the paper's
  likelihood weights): log p(z|x) on the sampled rationale tokens and log w = log p(y*|x, z) on the gold answer,
  so the gradient includes the pathwise term (spec eq. 7, 12, 14; spec 2.2, 2.3); a rollout that sampled EOS
  inside its rationale has no answer: its log p(z|x) includes the EOS token and its log w is -inf (w = 0), or
* the sampled sequences [prompt, rationale, `</think>`, sampled answer] (GRPO, spec 2.6, and GARL/PAFT with a 0/1
  verifier as weight): log p of every sampled token, with the reward.

The reward `rewards_BxG` is part of the batch: the user's reward functions ran on the host between the rollout and
the step (`scoring.py`; default: the string exact match against the gold answer). GRPO and weights="reward" use it;
the likelihood weights ignore it (every estimator logs reward/* from it).

The estimator (`garl_loss`, `paft_loss`, `grpo_loss` from `tsallis_jax.estimators`) turns these into a surrogate loss
whose gradient is the estimator; optax (global-norm clip, AdamW, warm-up schedule) applies it. q is evaluated from
the step inside jit (`schedules.q_schedule`), from a traced (q_start, q_end) pair, so runs that differ only in q share
one compiled step. The state is donated; shardings are explicit (`state.state_shardings`, batch over data x fsdp).

Compute (`TrainConfig.share_prompt_forward`, on by default): a group's G rows share their prompt, so each forward
pass (reference and policy, and the backward) runs each prompt once, packed with its G completions into one row
(`tsallis_jax.model.shared_prompt`); the same loss and gradient as one pass over every full row, for B*P + N*T token
positions instead of N*(P+T). Rows b*G + g must continue prompt b, as the rollout makes them.

Memory (`TrainConfig.micro_batch_prompts`, `logprob_chunk`): the gradient can be accumulated over micro-batches of
prompt groups (`accumulate_gradients`, a `lax.scan`), and log-probs and the entropy metric computed from hidden
states in chunks of positions, without the N x T x V logits; both leave the gradient unchanged in exact arithmetic.
With micro-batches the scan also returns every micro-batch's per-token log-probs (N x T floats, no vocabulary), and
the loss and metrics are computed once on the whole batch from them: the same code as without micro-batches, so no
metric needs a rule for merging micro-batches.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsallis_jax.estimators import SequenceLogProbs, garl_loss, grpo_loss, k3_kl, paft_loss
from tsallis_jax.model import make_attention_mask, make_positions, shared_prompt
from tsallis_jax.model.logprobs import aligned_token_logprobs, token_logprobs_from_hidden
from tsallis_jax.sampler import Rollout
from tsallis_jax.train import completions as completions_lib
from tsallis_jax.train.compile_ahead import AheadOfTime
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
    comp_NxT, z_NxT, y_NxT, valid_NxT, answered_N = completions_lib.teacher_forced_completion(
        rollout, gold_NxA, gold_mask_NxA, ids.close_tag_ids, ids.stop_ids, ids.pad_id)
  else:
    comp_NxT, valid_NxT = rollout.tokens_NxT, rollout.mask_NxT
    z_NxT, y_NxT, answered_N = rollout.mask_NxT & ~rollout.forced_mask_NxT, None, None
  tokens_NxS = jnp.concatenate([rollout.prompt_tokens_NxP, comp_NxT], axis=1)
  pad_NxS = jnp.concatenate([rollout.prompt_mask_NxP, valid_NxT], axis=1)
  return tokens_NxS, pad_NxS, z_NxT, y_NxT, answered_N


def _teacher_forced_pair(logp_NxT, z_NxT, y_NxT, answered_N):
  """(log p(z|x), log w = log p(y*|x, z)) per row from per-token log-probs of teacher-forced sequences: masked sums;
  log w = -inf (w = 0) for a rollout without an answer (EOS inside its rationale)."""
  logp_z_N = jnp.sum(jnp.where(z_NxT, logp_NxT, 0.0), axis=1)
  logw_N = jnp.where(answered_N, jnp.sum(jnp.where(y_NxT, logp_NxT, 0.0), axis=1), -jnp.inf)
  return logp_z_N, logw_N


def _sequence_pair(cfg: TrainConfig, logp_NxT, seqs: dict, G: int):
  """(log p(z|x), log w) per prompt and sample; with reward weights log w = 0 for a positive reward, else -inf."""
  z_NxT = seqs["z_NxT"]
  B = z_NxT.shape[0] // G
  if cfg.weights == "likelihood":
    logp_z_N, logw_N = _teacher_forced_pair(logp_NxT, z_NxT, seqs["y_NxT"], seqs["answered_N"])
    return logp_z_N.reshape(B, G), logw_N.reshape(B, G)
  logp_z_BxG = jnp.sum(jnp.where(z_NxT, logp_NxT, 0.0), axis=1).reshape(B, G)
  return logp_z_BxG, jnp.where(seqs["reward_BxG"] > 0, 0.0, -jnp.inf)


def _predicting_hidden(model, tokens_NxS, pad_NxS, num_prompt: int, group: int):
  """Hidden states at positions num_prompt - 1 .. S - 1 (N x T+1 x D): entry t predicts completion token t.

  `group` > 1: rows b*G + g (G = group) share prompt b, whose forward pass then runs once for its G rows
  (`shared_prompt.completion_hidden`, `TrainConfig.share_prompt_forward`); 1: one pass over every full row."""
  if group > 1:
    n = tokens_NxS.shape[0]
    first_of_group = lambda x_NxP: x_NxP.reshape(n // group, group, -1)[:, 0]  # noqa: E731
    return shared_prompt.completion_hidden(model, first_of_group(tokens_NxS[:, :num_prompt]),
                                           first_of_group(pad_NxS[:, :num_prompt]), tokens_NxS[:, num_prompt:],
                                           pad_NxS[:, num_prompt:])
  hidden_NxSxD, _ = model.hidden(tokens_NxS, make_positions(pad_NxS), make_attention_mask(pad_NxS))
  return hidden_NxSxD[:, num_prompt - 1:]


def _completion_logprobs(model, tokens_NxS, pad_NxS, num_prompt: int, temperature: float, with_entropy: bool,
                         chunk: int = 0, group: int = 1):
  """Per-token log-probs of the completion (and the entropy metric); `chunk` > 0 never builds the N x T x V logits;
  `group` > 1 runs each group's shared prompt once (`_predicting_hidden`)."""
  hidden_Nx1TxD = _predicting_hidden(model, tokens_NxS, pad_NxS, num_prompt, group)
  if chunk:
    return _completion_logprobs_chunked(model, hidden_Nx1TxD, tokens_NxS[:, num_prompt - 1:], temperature,
                                        with_entropy, chunk)
  # Only the T positions that predict completion tokens (num_prompt - 1 .. S - 2; position t-1 predicts t) go
  # through the vocabulary projection: the prompt's next-token logits are never used. (Projecting all S positions
  # cost the `smollm2` benchmark step 3x the LM-head FLOPs it needs, ~0.4 s of 3.6 s.)
  logits_NxTxV = model.logits(hidden_Nx1TxD[:, :-1]).astype(jnp.float32) / temperature
  logp_NxT = aligned_token_logprobs(logits_NxTxV, tokens_NxS[:, num_prompt:])
  if not with_entropy:
    return logp_NxT, None
  # Entropy of the next-token distribution that produced each completion token.
  logq_NxTxV = jax.nn.log_softmax(jax.lax.stop_gradient(logits_NxTxV), axis=-1)
  entropy_NxT = -jnp.sum(jnp.exp(logq_NxTxV) * logq_NxTxV, axis=-1)
  return logp_NxT, entropy_NxT


def _completion_logprobs_chunked(model, hidden_Nx1TxD, tokens_Nx1T, temperature: float, with_entropy: bool,
                                 chunk: int):
  """`_completion_logprobs` from the predicting positions' hidden states and the tokens from num_prompt - 1 on, in
  chunks of `chunk` positions of the vocabulary projection; the helper's leading zero (the first position has no
  prefix) is dropped."""
  logp_Nx1T = token_logprobs_from_hidden(model, hidden_Nx1TxD, tokens_Nx1T, temperature=temperature,
                                         chunk_size=chunk)
  logp_NxT = logp_Nx1T[:, 1:]
  if not with_entropy:
    return logp_NxT, None
  hidden_NxTxD = jax.lax.stop_gradient(hidden_Nx1TxD[:, :-1])
  w_VxD = jax.lax.stop_gradient(model.head_weight().astype(hidden_NxTxD.dtype))
  n, t, d = hidden_NxTxD.shape
  chunks = -(-t // chunk)
  hidden_ZxNxWxD = (jnp.pad(hidden_NxTxD, ((0, 0), (0, chunks * chunk - t), (0, 0)))  # Z chunks of W positions
                    .reshape(n, chunks, chunk, d).transpose(1, 0, 2, 3))

  def chunk_entropy(h_NxWxD):
    logits_NxWxV = jnp.einsum("nwd,vd->nwv", h_NxWxD, w_VxD, preferred_element_type=jnp.float32) / temperature
    logq_NxWxV = jax.nn.log_softmax(logits_NxWxV, axis=-1)
    return -jnp.sum(jnp.exp(logq_NxWxV) * logq_NxWxV, axis=-1)

  entropy_ZxNxW = jax.lax.map(chunk_entropy, hidden_ZxNxWxD)
  entropy_NxT = entropy_ZxNxW.transpose(1, 0, 2).reshape(n, chunks * chunk)[:, :t]
  return logp_NxT, entropy_NxT


def _estimator_loss(cfg: TrainConfig, q, keys_B, seqs: dict, logp_NxT, entropy_NxT, ref_logp_NxT,
                    kl_tokens=None, loss_scale: float = 1.0):
  """The surrogate loss and its metrics from the per-token log-probs `logp_NxT` of the groups in `seqs` (rows
  b*G+g). The whole batch by default; on a micro-batch `loss_scale` = m/B reweights the estimator's mean over prompts
  and `kl_tokens` (the whole batch's rationale-token count) makes the KL penalty's token mean, and GRPO's bnpo/dapo
  token mean, a sum over micro-batches."""
  G = cfg.num_samples
  z_NxT = seqs["z_NxT"]
  reward_BxG = seqs["reward_BxG"]
  N, T = z_NxT.shape
  B = N // G
  aux = {"policy/entropy": _masked_mean(entropy_NxT, z_NxT),
         "mismatch/logp_abs_diff": _masked_mean(jnp.abs(jax.lax.stop_gradient(logp_NxT)
                                                        - seqs["model_logp_NxT"]), z_NxT)}
  kl_NxT = None
  if ref_logp_NxT is not None:
    kl_NxT = k3_kl(logp_NxT, ref_logp_NxT)  # k3 estimate of KL(pi || pi_init) per sampled token
    aux["kl/ref"] = jax.lax.stop_gradient(_masked_mean(kl_NxT, z_NxT))
  if cfg.estimator == "grpo":
    seq = SequenceLogProbs(
        logp_z_BxGxT=logp_NxT.reshape(B, G, T), mask_z_BxGxT=z_NxT.reshape(B, G, T),
        ref_logp_z_BxGxT=None if ref_logp_NxT is None or cfg.kl_coef == 0 else ref_logp_NxT.reshape(B, G, T))
    loss, est = grpo_loss(seq, reward_BxG, loss_type=cfg.grpo_loss_type, scale_rewards=cfg.grpo_scale_rewards,
                          epsilon=cfg.grpo_clip_eps, beta=cfg.kl_coef)
    est = {k: v for k, v in est.items() if k != "kl/ref" or ref_logp_NxT is None}
    if loss_scale != 1.0 and cfg.grpo_loss_type in ("bnpo", "dapo"):
      # A token mean over this micro-batch -> its share of the token mean over the whole batch.
      loss = loss * jnp.maximum(jnp.sum(z_NxT.astype(jnp.float32)), 1.0) / kl_tokens
    elif loss_scale != 1.0:
      loss = loss * loss_scale  # grpo, seq_sum: means over sequences; dr_grpo: a sum over (sequences x T)
    return loss, {**aux, **est}
  logp_z_BxG, logw_BxG = _sequence_pair(cfg, logp_NxT, seqs, G)
  if cfg.estimator == "garl":
    loss, est = garl_loss(logp_z_BxG, logw_BxG, q=q, baseline=cfg.baseline, normalize_by_Mq=cfg.normalize_mq)
  else:
    loss, est = paft_loss(logp_z_BxG, logw_BxG, keys_B, q=q, num_resamples=cfg.resamples,
                          normalize_by_Mq=cfg.normalize_mq)
  if loss_scale != 1.0:
    loss = loss * loss_scale  # both losses are means over prompts
  if cfg.kl_coef > 0:
    if kl_tokens is None:
      loss = loss + cfg.kl_coef * _masked_mean(kl_NxT, z_NxT)
    else:
      loss = loss + cfg.kl_coef * jnp.sum(jnp.where(z_NxT, kl_NxT, 0.0)) / kl_tokens
  return loss, {**aux, **est}


def accumulate_gradients(loss_fn: Callable, params, xs):
  """Gradient accumulation: the sum over the leading axis of `xs` of `jax.grad(loss_fn, has_aux=True)(params, x)`,
  in a `lax.scan` (one micro-batch's activations alive at a time). `loss_fn(params, x) -> (loss, out)`; returns
  (summed grads, the micro-batches' `out` stacked along a leading axis). Knows nothing of estimators or metrics."""

  def body(grads_acc, x):
    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
    return jax.tree.map(jnp.add, grads_acc, grads), out

  return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)


def _prompt_group(cfg: TrainConfig) -> int:
  """Rows per shared prompt pass in the step's forward passes: G with `share_prompt_forward`, else 1."""
  return cfg.num_samples if cfg.share_prompt_forward else 1


def _ref_logprobs(ref_params, graphdef, cfg: TrainConfig, seqs: dict, num_prompt: int):
  if ref_params is None:
    return None
  logp_NxT, _ = _completion_logprobs(nnx.merge(graphdef, ref_params), seqs["tokens_NxS"], seqs["pad_NxS"], num_prompt,
                                     cfg.temperature, False, cfg.logprob_chunk, _prompt_group(cfg))
  return jax.lax.stop_gradient(logp_NxT)


def _micro_batched_grads(params, ref_params, graphdef, cfg: TrainConfig, seqs: dict, keys_B, q, num_prompt: int):
  """Gradient over B/m micro-batches of m prompts (`accumulate_gradients`); loss and metrics of the whole batch.

  Micro-batch z holds prompts z, z + Z, z + 2Z, ... (Z = B/m); its m*G rows are split over all devices (a
  multiple of the devices, `check_mesh`), so when m is a multiple of the devices every device keeps its own rows and
  otherwise only token ids and masks move. Equals the full-batch gradient in exact arithmetic: the estimators average
  over prompts, so each micro-batch's loss is scaled by m/B; a KL penalty's token mean divides by the whole batch's
  token count. PAFT's per-prompt keys are split from the step key before the split into micro-batches. The scan
  returns each micro-batch's per-token log-probs (and entropies, reference log-probs); put back in batch order they
  give the loss and every metric by the full-batch code (`_estimator_loss` on the whole batch, no gradient).
  """
  G, m = cfg.num_samples, cfg.micro_batch_prompts
  B = keys_B.shape[0]
  Z = B // m
  in_mesh = not jax.sharding.get_abstract_mesh().empty  # the train step runs under `jax.set_mesh`
  rows_over_devices = lambda x: (jax.lax.with_sharding_constraint(x, PartitionSpec(None, BATCH_AXES)) if in_mesh
                                 else x)

  def split_rows(x_Nx):  # rows b*G+g with b = i*Z+z -> [z, i*G+g]
    x_mxZxGx = x_Nx.reshape(m, Z, G, *x_Nx.shape[1:])
    return rows_over_devices(jnp.swapaxes(x_mxZxGx, 0, 1).reshape(Z, m * G, *x_Nx.shape[1:]))

  def merge_rows(x_ZxMx):  # the inverse of split_rows
    x_mxZxGx = jnp.swapaxes(x_ZxMx.reshape(Z, m, G, *x_ZxMx.shape[2:]), 0, 1)
    return x_mxZxGx.reshape(B * G, *x_ZxMx.shape[2:])

  def split_prompts(x_Bx):
    return rows_over_devices(jnp.swapaxes(x_Bx.reshape(m, Z, *x_Bx.shape[1:]), 0, 1))

  xs = {k: split_rows(v) for k, v in seqs.items() if v is not None and k != "reward_BxG"}
  xs["reward_BxG"] = split_prompts(seqs["reward_BxG"])
  xs["keys_B"] = split_prompts(keys_B)
  kl_tokens = jnp.maximum(jnp.sum(seqs["z_NxT"].astype(jnp.float32)), 1.0)

  def micro_loss(p, x):
    mb = {"y_NxT": None, "answered_N": None, **x}
    ref_logp_NxT = _ref_logprobs(ref_params, graphdef, cfg, mb, num_prompt)
    logp_NxT, entropy_NxT = _completion_logprobs(nnx.merge(graphdef, p), mb["tokens_NxS"], mb["pad_NxS"], num_prompt,
                                                 cfg.temperature, True, cfg.logprob_chunk, _prompt_group(cfg))
    loss, _ = _estimator_loss(cfg, q, mb["keys_B"], mb, logp_NxT, entropy_NxT, ref_logp_NxT, kl_tokens=kl_tokens,
                              loss_scale=m / B)
    return loss, {"logp": jax.lax.stop_gradient(logp_NxT), "entropy": entropy_NxT, "ref": ref_logp_NxT}

  grads, scores_Z = accumulate_gradients(micro_loss, params, xs)
  scores = jax.tree.map(merge_rows, scores_Z)
  loss, aux = _estimator_loss(cfg, q, keys_B, seqs, scores["logp"], scores["entropy"], scores.get("ref"))
  return loss, aux, grads


def _batch_sequences(cfg: TrainConfig, ids: TokenIds, batch: dict) -> dict:
  """The scored sequences, their masks and the rewards of a train batch (rows b*G+g)."""
  rollout: Rollout = batch["rollout"]
  G = cfg.num_samples
  B = rollout.tokens_NxT.shape[0] // G
  gold_NxA = jnp.repeat(batch["answer_tokens_BxA"], G, axis=0)
  gold_mask_NxA = jnp.repeat(batch["answer_mask_BxA"], G, axis=0)
  tokens_NxS, pad_NxS, z_NxT, y_NxT, answered_N = _sequences(cfg, ids, rollout, gold_NxA, gold_mask_NxA)
  return {"tokens_NxS": tokens_NxS, "pad_NxS": pad_NxS, "z_NxT": z_NxT, "y_NxT": y_NxT, "answered_N": answered_N,
          "model_logp_NxT": rollout.model_logp_NxT,
          "reward_BxG": batch["rewards_BxG"].astype(jnp.float32).reshape(B, G)}


def teacher_forced_scores(model, rollout: Rollout, gold_NxA, gold_mask_NxA, ids: TokenIds, *,
                          temperature: float = 1.0, chunk: int = 0, group: int = 1):
  """(logp_z_N, logw_N): log p(z|x) of each sampled rationale and log w = log p(y*|x, z) of the gold answer
  teacher-forced after it (-inf when the rollout never answers), from one forward at `temperature` (spec eq. 7).
  The one teacher-forced scorer: the train step, `rationale_scores` and `success.make_scorer` all use it.
  `group` > 1: rows b*G + g (G = group) continue prompt b, which then runs once for its G rows
  (`_predicting_hidden`)."""
  comp_NxT, z_NxT, y_NxT, valid_NxT, answered_N = completions_lib.teacher_forced_completion(
      rollout, gold_NxA, gold_mask_NxA, ids.close_tag_ids, ids.stop_ids, ids.pad_id)
  tokens_NxS = jnp.concatenate([rollout.prompt_tokens_NxP, comp_NxT], axis=1)
  pad_NxS = jnp.concatenate([rollout.prompt_mask_NxP, valid_NxT], axis=1)
  logp_NxT, _ = _completion_logprobs(model, tokens_NxS, pad_NxS, rollout.prompt_tokens_NxP.shape[1], temperature,
                                     False, chunk, group)
  return _teacher_forced_pair(logp_NxT, z_NxT, y_NxT, answered_N)


def rationale_scores(params, graphdef, cfg: TrainConfig, ids: TokenIds, batch: dict):
  """(logp_z_BxG, logw_BxG): log p(z|x) and log w of every rollout as the step scores them (GARL/PAFT, likelihood
  weights)."""
  G = cfg.num_samples
  logp_z_N, logw_N = teacher_forced_scores(
      nnx.merge(graphdef, params), batch["rollout"], jnp.repeat(batch["answer_tokens_BxA"], G, axis=0),
      jnp.repeat(batch["answer_mask_BxA"], G, axis=0), ids, temperature=cfg.temperature, chunk=cfg.logprob_chunk,
      group=_prompt_group(cfg))
  return logp_z_N.reshape(-1, G), logw_N.reshape(-1, G)


def loss_and_metrics(params, ref_params, graphdef, cfg: TrainConfig, ids: TokenIds, batch: dict, key, q):
  """The estimator's surrogate loss and its metrics (everything but the optimizer)."""
  rollout: Rollout = batch["rollout"]
  if "rewards_BxG" not in batch:
    raise ValueError("the train batch has no rewards_BxG: compute them on the host between the rollout and the step"
                     " (tsallis_jax.train.scoring.rollout_rewards)")
  G = cfg.num_samples
  B = rollout.tokens_NxT.shape[0] // G
  P = rollout.prompt_tokens_NxP.shape[1]
  seqs = _batch_sequences(cfg, ids, batch)
  tokens_NxS, pad_NxS, reward_BxG = seqs["tokens_NxS"], seqs["pad_NxS"], seqs["reward_BxG"]
  keys_B = jax.random.split(key, B)  # one resampling key per prompt, before any split of the batch (PAFT)

  if cfg.micro_batch_prompts:
    loss, aux, grads = _micro_batched_grads(params, ref_params, graphdef, cfg, seqs, keys_B, q, P)
  else:
    ref_logp_NxT = _ref_logprobs(ref_params, graphdef, cfg, seqs, P)

    def loss_fn(p):
      logp_NxT, entropy_NxT = _completion_logprobs(nnx.merge(graphdef, p), tokens_NxS, pad_NxS, P, cfg.temperature,
                                                   True, cfg.logprob_chunk, _prompt_group(cfg))
      return _estimator_loss(cfg, q, keys_B, seqs, logp_NxT, entropy_NxT, ref_logp_NxT)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  std_B = jnp.std(reward_BxG, axis=1)
  completion_len_N = rollout.lengths_N.astype(jnp.float32)
  metrics = {
    "loss": loss,
    "jq/q": jnp.asarray(q, jnp.float32),
    "reward/mean": jnp.mean(reward_BxG),
    "reward/std": jnp.std(reward_BxG, ddof=1 if reward_BxG.size > 1 else 0),  # Bessel-corrected, as TRL's
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


def optimizer_update(cfg: TrainConfig, tx: optax.GradientTransformation, grads, opt_state, params
                     ) -> tuple[Any, Any, dict[str, jax.Array]]:
  """The step's optimizer part: `tx`'s update applied to the params, and the norms the step logs (`grad_norm`;
  `update_norm` with `TrainConfig.update_norm_metric`, one more pass over the update). Returns
  `(params, opt_state, metrics)`; `experiments/benchmarks/gemm_ceiling.py` times it alone."""
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"grad_norm": optax.tree.norm(grads)}
  if cfg.update_norm_metric:
    metrics["update_norm"] = optax.tree.norm(updates)
  return params, opt_state, metrics


def make_train_step(cfg: TrainConfig, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, ids: TokenIds,
                    mesh: Mesh, state_sh: TrainState, abstract_batch: Any,
                    compiler_options: dict[str, Any] | None = None) -> Callable:
  """The jitted step `(state, batch, key, q_range) -> (state, metrics)`; `q_range` = float32 (q_start, q_end).

  `.jitted` is the `jax.jit` function; `.compile_ahead(state, batch, key, q_range)` (arrays or shapes) starts its
  compile for those shapes in a background thread, which the first matching call then uses (`compile_ahead`).
  `compiler_options`: XLA's options for its compile (`jax.jit`'s; `build_programs` passes `tsallis_jax.xla_cpu`'s)."""
  lr_fn = learning_rate_schedule(cfg)

  def step_fn(state: TrainState, batch: dict, key: jax.Array, q_range: jax.Array):
    q = q_schedule_from_config(cfg, q_range[0], q_range[1])(state.step)
    grads, metrics = loss_and_metrics(state.params, state.ref_params, graphdef, cfg, ids, batch, key, q)
    params, opt_state, optimizer_metrics = optimizer_update(cfg, tx, grads, state.opt_state, state.params)
    metrics.update(optimizer_metrics)
    metrics["learning_rate"] = jnp.asarray(lr_fn(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  rep = replicated(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sharding(mesh, abstract_batch), rep, rep),
                   out_shardings=(state_sh, rep), donate_argnums=(0,), compiler_options=compiler_options)

  ahead = AheadOfTime(jitted, mesh)

  def run(state, batch, key, q_range):
    return ahead(state, batch, key, q_range)

  run.jitted = jitted
  run.compile_ahead = ahead.start
  return run
