"""Micro-batched gradient accumulation and chunked log-probs leave the train step unchanged (up to float rounding).

`micro_batch_prompts` splits the B prompt groups into micro-batches scanned with `lax.scan`; every estimator's
surrogate loss is a mean over prompts (spec 2.2, 2.3, 2.6), so the accumulated gradient equals the full-batch one.
`logprob_chunk` scores tokens from hidden states without the full logits. The update and every metric must match.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train_step import BASE, _batch, _setup, train_batch_of
from tsallis_jax import distributed
from tsallis_jax.train import loop
from tsallis_jax.train.config import ConfigError, check_mesh


def _one_step(cfg, mesh, q=0.75):
  """One step whose gold answer is a sampled answer of the group (where one closed), so that some rewards are 1 and
  GRPO's advantages are not all zero."""
  programs, state = _setup(cfg, mesh)
  batch = _batch(cfg, mesh)
  rollout_key, step_key = loop._step_keys(state.key, 0)
  rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
  r = jax.device_get(rollout)
  b, g, a = cfg.batch_size, cfg.num_samples, cfg.max_answer_len
  gold_BxA = np.array(jax.device_get(batch["answer_tokens_BxA"]))
  gold_mask_BxA = np.ones((b, a), bool)
  for i in range(b):
    closed = [n for n in range(i * g, (i + 1) * g) if r.closed_N[n]]
    if closed:
      n = closed[0]
      length = int(r.answer_mask_NxT[n].sum())
      start = int(r.answer_start_N[n])
      gold_BxA[i, :length] = r.tokens_NxT[n, start:start + length]
      gold_mask_BxA[i] = np.arange(a) < length
  answers = loop._put_rows(mesh, {"answer_tokens_BxA": gold_BxA, "answer_mask_BxA": gold_mask_BxA}, b)
  train_batch = train_batch_of(cfg, mesh, rollout, answers)
  state, metrics = programs.train_step(state, train_batch, step_key, jnp.asarray([q, q], jnp.float32))
  return jax.device_get(state.params), jax.device_get(metrics), r.tokens_NxT


@pytest.mark.parametrize("estimator, grpo_loss_type", [("garl", "grpo"), ("paft", "grpo"), ("grpo", "grpo"),
                                                      ("grpo", "dapo"), ("grpo", "dr_grpo")])
def test_micro_batches_and_chunks_match_full_batch(estimator, grpo_loss_type):
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  # PAFT's micro-batched step runs on 8 devices (data x fsdp), each micro-batch's rows split over all of them.
  micro_mesh = distributed.make_mesh({"data": 4, "fsdp": 2}) if estimator == "paft" else mesh
  # Plain SGD, so the parameters compare the gradients themselves (Adam's first step is sign-like and would blow
  # float noise on near-zero gradient coordinates up to the learning rate).
  cfg = BASE.replace(estimator=estimator, optimizer="sgd", learning_rate=1.0, grpo_loss_type=grpo_loss_type)
  params_full, metrics_full, tokens_full = _one_step(cfg, mesh)
  micro = cfg.replace(micro_batch_prompts=cfg.batch_size // 2, logprob_chunk=7)
  params_micro, metrics_micro, tokens_micro = _one_step(micro, micro_mesh)
  np.testing.assert_array_equal(tokens_full, tokens_micro)
  assert sorted(metrics_full) == sorted(metrics_micro)
  for k in metrics_full:
    np.testing.assert_allclose(metrics_micro[k], metrics_full[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_micro, params_full)
  assert metrics_full["grad_norm"] > 0 and 0 < metrics_full["reward/mean"] < 1


def test_config_rejects_bad_micro_batches():
  with pytest.raises(ConfigError, match="does not divide batch_size"):
    BASE.replace(micro_batch_prompts=3)
  with pytest.raises(ConfigError, match="grpo_scale_rewards"):
    BASE.replace(estimator="grpo", grpo_scale_rewards="batch", micro_batch_prompts=4)
  with pytest.raises(ConfigError, match="must be >= 0"):
    BASE.replace(logprob_chunk=-1)
  with pytest.raises(ConfigError, match="do not split over the 8 devices"):
    check_mesh(BASE.replace(micro_batch_prompts=1, num_samples=4), 8)
  assert check_mesh(BASE.replace(micro_batch_prompts=2, num_samples=4), 8) == (8, 1)
