"""The estimators' contract: input errors, the SequenceLogProbs form, GRPO's TRL-style options, no NaN on random
valid inputs (spec 2.2-2.3, 2.6)."""
import hypothesis
from hypothesis import strategies as st
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tabular
from tsallis_jax import SequenceLogProbs, garl_grad, garl_loss, grpo_loss, paft_grad, paft_loss
from tsallis_jax.estimators import as_pair, grpo_advantages


def _pair(num_prompts=2, num_samples=4, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.uniform(k1, (num_prompts, num_samples), minval=-20, maxval=0),
          jax.random.uniform(k2, (num_prompts, num_samples), minval=-5, maxval=0))


# Clear errors.


@pytest.mark.parametrize("bad_q", [-0.01, 1.5, float("nan")])
def test_q_outside_unit_interval(bad_q):
  logp_z_BxG, logw_BxG = _pair()
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    garl_loss(logp_z_BxG, logw_BxG, q=bad_q)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    paft_loss(logp_z_BxG, logw_BxG, jax.random.key(0), q=bad_q)
  params = _tabular.init_params(jax.random.key(0), 2, 3)
  batch = {"idx_BxG": jnp.zeros((2, 4), jnp.int32)}
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    garl_grad(_tabular.logprob_fn, params, batch, q=bad_q)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    paft_grad(_tabular.logprob_fn, params, batch, jax.random.key(0), q=bad_q)


def test_shape_errors():
  logp_z_BxG, logw_BxG = _pair(num_samples=1)
  with pytest.raises(ValueError, match="G >= 2"):
    garl_loss(logp_z_BxG, logw_BxG, q=0.5, baseline="rloo")
  chex.assert_tree_all_finite(garl_loss(logp_z_BxG, logw_BxG, q=0.5, baseline="none"))
  logp_z_BxG, logw_BxG = _pair()
  with pytest.raises(ValueError, match="same shape"):
    garl_loss(logp_z_BxG, logw_BxG[:, :3], q=0.5)
  with pytest.raises(ValueError, match="same shape"):
    paft_loss(logp_z_BxG[:1], logw_BxG, jax.random.key(0), q=0.5)
  with pytest.raises(ValueError, match="rank-2"):
    garl_loss(logp_z_BxG[0], logw_BxG[0], q=0.5)
  with pytest.raises(ValueError, match="baseline"):
    garl_loss(logp_z_BxG, logw_BxG, q=0.5, baseline="mean")
  with pytest.raises(ValueError, match="num_resamples"):
    paft_loss(logp_z_BxG, logw_BxG, jax.random.key(0), q=0.5, num_resamples=0)
  with pytest.raises(ValueError, match="keys"):
    paft_loss(logp_z_BxG, logw_BxG, jax.random.split(jax.random.key(0), 3), q=0.5)
  with pytest.raises(ValueError, match="mask_z_BxGxT"):
    as_pair(SequenceLogProbs(jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 5))))
  with pytest.raises(ValueError, match="logp_y_BxGxT"):
    garl_grad(lambda p, b: SequenceLogProbs(p * jnp.zeros((2, 4, 3)), jnp.ones((2, 4, 3))), 1.0, None, q=0.5)


def test_grpo_errors():
  seq = SequenceLogProbs(jnp.zeros((2, 3, 4)), jnp.ones((2, 3, 4)))
  rewards_BxG = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="loss_type"):
    grpo_loss(seq, rewards_BxG, loss_type="ppo")
  with pytest.raises(ValueError, match="scale_rewards"):
    grpo_loss(seq, rewards_BxG, scale_rewards="std")
  with pytest.raises(ValueError, match="ref_logp_z_BxGxT"):
    grpo_loss(seq, rewards_BxG, beta=0.1)
  with pytest.raises(ValueError, match="rewards_BxG"):
    grpo_loss(seq, jnp.zeros((2, 4)))


# The SequenceLogProbs form reduces to the pair form by masked sums.


def test_sequence_form_matches_pair_form_and_ignores_padding():
  key_z, key_y = jax.random.split(jax.random.key(1))
  logp_z_BxGxT = jax.random.uniform(key_z, (2, 4, 5), minval=-3, maxval=0)
  logp_y_BxGxT = jax.random.uniform(key_y, (2, 4, 2), minval=-2, maxval=0)
  mask_z_BxGxT = (jnp.arange(5)[None, None] < jnp.array([[5, 3, 1, 4], [2, 5, 5, 3]])[..., None]).astype(jnp.int32)
  mask_y_BxGxT = jnp.ones((2, 4, 2)).at[:, :, 1].set(jnp.array([[1, 0, 1, 1], [0, 0, 1, 1]]))
  garbage_z = jnp.where(mask_z_BxGxT > 0, logp_z_BxGxT, 1e9)  # padding must be ignored, whatever it holds
  garbage_y = jnp.where(mask_y_BxGxT > 0, logp_y_BxGxT, jnp.nan)
  sum_z = np.sum(np.where(mask_z_BxGxT > 0, logp_z_BxGxT, 0), -1)
  sum_y = np.sum(np.where(mask_y_BxGxT > 0, logp_y_BxGxT, 0), -1)

  def seq_fn(params, batch):
    return SequenceLogProbs(params["z"], mask_z_BxGxT, params["y"], mask_y_BxGxT)

  for q in (0.0, 0.5, 1.0):
    grads, aux = garl_grad(seq_fn, {"z": garbage_z, "y": garbage_y}, None, q=q)
    chex.assert_tree_all_finite((grads, aux))
    reference = garl_loss(jnp.asarray(sum_z), jnp.asarray(sum_y), q=q)[0]
    np.testing.assert_allclose(aux["loss"], reference, rtol=1e-5)
    ref_grads = jax.grad(lambda a, b: garl_loss(a, b, q=q)[0], argnums=(0, 1))(jnp.asarray(sum_z),
                                                                                jnp.asarray(sum_y))
    np.testing.assert_allclose(grads["z"], np.asarray(ref_grads[0])[..., None] * mask_z_BxGxT, rtol=1e-5)
    np.testing.assert_allclose(grads["y"], np.asarray(ref_grads[1])[..., None] * mask_y_BxGxT, rtol=1e-5)


# GRPO options, each against an independent NumPy computation.


def _grpo_case():
  key_l, key_r = jax.random.split(jax.random.key(2))
  logp_BxGxT = jax.random.uniform(key_l, (2, 3, 4), minval=-3, maxval=-0.1)
  lengths_BxG = np.array([[4, 2, 1], [3, 4, 2]])
  mask_BxGxT = (np.arange(4)[None, None] < lengths_BxG[..., None]).astype(np.float32)
  rewards_BxG = jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
  return logp_BxGxT, jnp.asarray(mask_BxGxT), rewards_BxG


def test_grpo_advantages_match_numpy():
  rewards_BxG = np.array([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.4, 0.4]])
  centred = rewards_BxG - rewards_BxG.mean(1, keepdims=True)
  for ddof in (0, 1):
    group_std = rewards_BxG.std(1, ddof=ddof, keepdims=True)
    expected = np.where(group_std > 0, centred / (group_std + 1e-4), 0.0)
    np.testing.assert_allclose(grpo_advantages(rewards_BxG, std_ddof=ddof), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grpo_advantages(rewards_BxG, scale_rewards="batch", std_ddof=ddof),
                               centred / (rewards_BxG.std(ddof=ddof) + 1e-4), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grpo_advantages(rewards_BxG, scale_rewards="none"), centred, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "seq_sum"])
def test_grpo_aggregation(loss_type):
  logp_BxGxT, mask_BxGxT, rewards_BxG = _grpo_case()
  adv_BxG = np.asarray(grpo_advantages(rewards_BxG))
  mask = np.asarray(mask_BxGxT)
  lengths_BxG = mask.sum(-1)
  num_sequences, max_len = mask.shape[0] * mask.shape[1], mask.shape[2]
  per_token_weight = {
    "grpo": 1.0 / (num_sequences * lengths_BxG[..., None]),
    "bnpo": np.full_like(mask, 1.0 / mask.sum()),
    "dapo": np.full_like(mask, 1.0 / mask.sum()),
    "dr_grpo": np.full_like(mask, 1.0 / (num_sequences * max_len)),
    "seq_sum": np.full_like(mask, 1.0 / num_sequences),
  }[loss_type] * mask
  loss_fn = lambda logp: grpo_loss(SequenceLogProbs(logp, mask_BxGxT), rewards_BxG, loss_type=loss_type)[0]
  loss, grad = jax.value_and_grad(loss_fn)(logp_BxGxT)
  np.testing.assert_allclose(grad, -adv_BxG[..., None] * per_token_weight, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, -np.sum(adv_BxG[..., None] * per_token_weight), atol=1e-6)


def test_grpo_ppo_clipping_and_k3_kl():
  logp_BxGxT, mask_BxGxT, rewards_BxG = _grpo_case()
  adv_BxGx1 = np.asarray(grpo_advantages(rewards_BxG))[..., None]
  shift = jnp.array([0.5, -0.5, 0.05, 0.0])[None, None]  # ratios e^0.5 > 1.2, e^-0.5 < 0.8, inside, exactly 1
  old_BxGxT = logp_BxGxT - shift
  seq = SequenceLogProbs(logp_BxGxT, mask_BxGxT, old_logp_z_BxGxT=old_BxGxT)
  loss_fn = lambda logp: grpo_loss(seq.replace(logp_z_BxGxT=logp), rewards_BxG, loss_type="bnpo")
  (_, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp_BxGxT)
  ratio = np.exp(np.broadcast_to(np.asarray(shift), logp_BxGxT.shape))
  clipped = ((ratio > 1.2) & (adv_BxGx1 > 0)) | ((ratio < 0.8) & (adv_BxGx1 < 0))
  mask = np.asarray(mask_BxGxT)
  expected = np.where(clipped, 0.0, -adv_BxGx1 * ratio) * mask / mask.sum()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux["ratio/clipfrac"], (clipped * mask).sum() / mask.sum(), rtol=1e-6)
  # epsilon_high widens only the upper side (DAPO's clip-higher).
  wide = jax.grad(lambda logp: grpo_loss(seq.replace(logp_z_BxGxT=logp), rewards_BxG, loss_type="bnpo",
                                         epsilon_high=1.0)[0])(logp_BxGxT)
  clipped_wide = (ratio < 0.8) & (adv_BxGx1 < 0)
  np.testing.assert_allclose(wide, np.where(clipped_wide, 0.0, -adv_BxGx1 * ratio) * mask / mask.sum(),
                             rtol=1e-5, atol=1e-7)
  # k3 KL: with equal rewards only the penalty acts; d/dlogp [e^(r-l) - (r-l) - 1] = 1 - e^(r-l).
  ref_BxGxT = logp_BxGxT + 0.3
  kl_seq = SequenceLogProbs(logp_BxGxT, mask_BxGxT, ref_logp_z_BxGxT=ref_BxGxT)
  kl_fn = lambda logp: grpo_loss(kl_seq.replace(logp_z_BxGxT=logp), jnp.ones((2, 3)), loss_type="bnpo", beta=0.1)
  (_, aux), grad = jax.value_and_grad(kl_fn, has_aux=True)(logp_BxGxT)
  np.testing.assert_allclose(grad, 0.1 * (1 - np.exp(0.3)) * mask / mask.sum(), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(aux["kl/ref"], np.exp(0.3) - 0.3 - 1, rtol=1e-5)


# Property: random valid inputs never give NaN (values, gradients, metrics), for every q, traced or not.


@jax.jit
def _all_estimators(logp_z_BxG, logw_BxG, rewards_BxG, key, q):
  def total(a, b):
    losses, auxes = [], []
    for loss, aux in (garl_loss(a, b, q=q, baseline="rloo"), garl_loss(a, b, q=q, baseline="none"),
                      paft_loss(a, b, key, q=q), grpo_loss((a, b), rewards_BxG)):
      losses.append(loss)
      auxes.append(aux)
    return sum(losses), auxes
  return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(logp_z_BxG, logw_BxG)


_log_weight = st.one_of(st.floats(-1e4, 0.0), st.just(-np.inf), st.just(0.0), st.floats(-80.0, -60.0))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    logw=st.lists(_log_weight, min_size=8, max_size=8),
    logp=st.lists(st.floats(-1e3, 0.0), min_size=8, max_size=8),
    rewards=st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=8, max_size=8),
    q=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])),
    seed=st.integers(0, 2 ** 16))
def test_property_no_nan(logw, logp, rewards, q, seed):
  shape = (2, 4)
  (loss, auxes), grads = _all_estimators(jnp.asarray(logp, jnp.float32).reshape(shape),
                                         jnp.asarray(logw, jnp.float32).reshape(shape),
                                         jnp.asarray(rewards, jnp.float32).reshape(shape),
                                         jax.random.key(seed), jnp.float32(q))
  chex.assert_tree_all_finite((loss, auxes, grads))
