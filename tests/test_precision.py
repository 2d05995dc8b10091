"""The precision contract (issue 17): bfloat16 compute with float32 parameters through the jitted train step.

The model computes in `ModelConfig.dtype`; logits, log-softmax, per-token log-probs and all estimator maths (log
weights, log-sum-exp, q-scaling, advantages, k3 KL) are float32, and the optimizer updates float32 parameters. The
gradient test compares the step's gradient under bfloat16 compute with the float32 one on the same params and the
same fixed rollout, so sampling never enters.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax import distributed
from tsallis_jax.estimators import SequenceLogProbs, garl_loss, grpo_loss, k3_kl, paft_loss
from tsallis_jax.model import ModelConfig, Transformer, abstract_model, create_model, sequence_logprobs
from tsallis_jax.train import loop
from tsallis_jax.train import state as state_lib
from tsallis_jax.train import step as step_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.programs import build_programs
from tsallis_jax.train.step import TokenIds

from test_train_step import EOS, PAD, TAG, _batch  # the same left-padded prompts and token ids as the step tests

VOCAB = 12  # small, so that some rollouts end inside their rationale and some answer
IDS = TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG,))
BASE = TrainConfig(max_prompt_len=6, rationale_budget=4, max_answer_len=3, num_samples=4, batch_size=8,
                   eval_batch_size=8, num_steps=10, learning_rate=1e-2, progress_bar="off")


def _model_config(dtype: str) -> ModelConfig:
  # GQA (4 query heads over 2 kv heads), two layers, float32 parameters whatever the compute dtype.
  return ModelConfig.tiny(vocab_size=VOCAB, num_layers=2, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2,
                          head_dim=8, dtype=dtype, param_dtype="float32")


def _fixed_batch(cfg: TrainConfig, mesh, params):
  """One rollout sampled by the float32 model (then fixed), and 0/1 rewards with both values in every group."""
  graphdef, abstract_vars = nnx.split(abstract_model(_model_config("float32")))
  programs = build_programs(cfg, graphdef, abstract_vars, mesh, IDS, _model_config("float32").sharding_rules)
  state = state_lib.init_state(params, programs.tx, cfg.seed, programs.state_shardings, True)
  batch = _batch(cfg, mesh, vocab=VOCAB)
  rollout_key, step_key = loop._step_keys(state.key, 0)
  rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
  rewards_BxG = np.tile(np.asarray([1.0, 0.0, 0.0, 1.0], np.float32), (cfg.batch_size, 1))
  rewards_BxG[::2] = rewards_BxG[::2, ::-1]
  return {"rollout": jax.device_get(rollout), "answer_tokens_BxA": jax.device_get(batch["answer_tokens_BxA"]),
          "answer_mask_BxA": jax.device_get(batch["answer_mask_BxA"]), "rewards_BxG": rewards_BxG}, step_key


@pytest.fixture(scope="module")
def fixed():
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  params = jax.device_get(state_lib.pure(nnx.state(create_model(_model_config("float32"), seed=0))))
  batch, key = _fixed_batch(BASE, mesh, params)
  return params, batch, key


def _step_grads(cfg: TrainConfig, dtype: str, params, batch, key):
  """The train step's gradient and metrics (`step.loss_and_metrics`, jitted, as `make_train_step` calls it)."""
  graphdef = nnx.graphdef(abstract_model(_model_config(dtype)))
  fn = jax.jit(lambda p, ref, b, k: step_lib.loss_and_metrics(p, ref, graphdef, cfg, IDS, b, k, cfg.q))
  return fn(params, params if cfg.kl_coef > 0 else None, batch, key)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


CASES = {"grpo": dict(estimator="grpo", kl_coef=0.04), "garl_q0.5": dict(estimator="garl", q=0.5),
         "garl_q1": dict(estimator="garl", q=1.0), "paft_q0.5": dict(estimator="paft", q=0.5)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_compute_gradient_agrees_with_float32(fixed, case):
  """Same params, same fixed rollout: the step's gradient under bfloat16 compute vs float32 compute.

  Measured on this tiny model (2 layers, D 32, GQA; JAX 0.10.2, XLA CPU): cosine 0.99998 in every case, relative L2
  difference |g16 - g32| / |g32| of 0.0055 (GARL q = 0.5), 0.0059 (GARL q = 1), 0.0068 (PAFT q = 0.5) and 0.0069
  (GRPO with k3 KL). bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 ~ 0.002 per rounding; the
  gradient passes a handful of rounded activations (projections, residual adds, their backward) whose errors add
  like a random walk, hence ~3x that. Bounds: cosine > 0.999 and relative L2 < 0.025, ~3.5x the largest measured
  value. A float32 quantity computed in bfloat16 by mistake breaks them: a bfloat16 log w (a sum of log-probs near
  -10 has a spacing of 0.06) scales w / w-bar^q by several %, a bfloat16 log-softmax more.
  """
  params, batch, key = fixed
  cfg = BASE.replace(**CASES[case])
  grads32, metrics32 = _step_grads(cfg, "float32", params, batch, key)
  grads16, metrics16 = _step_grads(cfg, "bfloat16", params, batch, key)
  for leaf in jax.tree.leaves(grads16):
    assert leaf.dtype == jnp.float32  # gradients of float32 params, whatever the compute dtype
  chex.assert_tree_all_finite(grads16)
  g32, g16 = _flat(grads32), _flat(grads16)
  assert np.linalg.norm(g32) > 0
  cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
  rel = float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32))
  print(f"{case}: cosine {cos:.6f}, relative L2 {rel:.4f}")
  assert cos > 0.999 and rel < 0.025, (cos, rel)
  for name, value in metrics16.items():
    assert value.dtype == jnp.float32 or jnp.issubdtype(value.dtype, jnp.integer), (name, value.dtype)
  np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=0.05, atol=1e-3)


def test_bfloat16_train_step_updates_float32_params(fixed):
  """The whole jitted step (AdamW, clipping) under bfloat16 compute: params and optimizer state stay float32."""
  params, batch, key = fixed
  cfg = BASE.replace(estimator="garl", q=0.75, update_norm_metric=True)
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  graphdef, abstract_vars = nnx.split(abstract_model(_model_config("bfloat16")))
  programs = build_programs(cfg, graphdef, abstract_vars, mesh, IDS, _model_config("bfloat16").sharding_rules)
  state = state_lib.init_state(params, programs.tx, cfg.seed, programs.state_shardings, True)
  new_state, metrics = programs.train_step(state, batch, key, jnp.asarray([cfg.q, cfg.q], jnp.float32))
  for leaf in jax.tree.leaves(new_state.params) + [x for x in jax.tree.leaves(new_state.opt_state)
                                                   if jnp.issubdtype(x.dtype, jnp.floating)]:
    assert leaf.dtype == jnp.float32
  chex.assert_tree_all_finite(new_state.params)
  assert float(metrics["update_norm"]) > 0 and metrics["loss"].dtype == jnp.float32


def test_estimators_return_float32_under_bfloat16_compute():
  """Log-probs of a bfloat16 model are float32, and every estimator's loss and metrics are float32 even when handed
  bfloat16 log-probs (each casts at its boundary)."""
  cfg = _model_config("bfloat16")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens_NxT = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (8, 6)), jnp.int32)
  pad_NxT = jnp.arange(6)[None] >= jnp.asarray([0, 1, 2, 0, 0, 3, 1, 0])[:, None]
  seg_NxT = pad_NxT & (jnp.arange(6)[None] >= 4)
  logps, logp_NxT = sequence_logprobs(model, tokens_NxT, pad_NxT, {"z": seg_NxT & (jnp.arange(6)[None] == 4),
                                                                   "y": seg_NxT & (jnp.arange(6)[None] == 5)})
  assert logp_NxT.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in logps.values())
  logp_z_BxG16 = logps["z"].reshape(2, 4).astype(jnp.bfloat16)
  logw_BxG16 = logps["y"].reshape(2, 4).astype(jnp.bfloat16)
  outs = [garl_loss(logp_z_BxG16, logw_BxG16, q=0.5), paft_loss(logp_z_BxG16, logw_BxG16, jax.random.key(0), q=0.5)]
  seq = SequenceLogProbs(logp_z_BxGxT=logp_NxT.reshape(2, 4, 6).astype(jnp.bfloat16),
                         mask_z_BxGxT=seg_NxT.reshape(2, 4, 6),
                         ref_logp_z_BxGxT=jnp.zeros((2, 4, 6), jnp.bfloat16))
  outs.append(grpo_loss(seq, jnp.asarray([[1.0, 0, 0, 1], [0, 1, 0, 0]], jnp.bfloat16), beta=0.04))
  for loss, aux in outs:
    assert loss.dtype == jnp.float32
    for name, value in aux.items():
      assert value.dtype in (jnp.float32, jnp.bool_) or jnp.issubdtype(value.dtype, jnp.integer), (name, value.dtype)
  assert k3_kl(logp_NxT.astype(jnp.bfloat16), jnp.zeros((8, 6), jnp.bfloat16)).dtype == jnp.float32
