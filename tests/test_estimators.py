"""Spec section 3, facts 8-15, on the tabular softmax policy of tests/_tabular.py.

Expectations over the M samples are exact: every multiset of M draws is enumerated with its multinomial probability
(the estimators are symmetric in the order of the samples), so the only tolerance is float32 round-off.
"""
import functools

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

import _tabular
from tsallis_jax import garl_grad, garl_loss, grpo_grad, jq_loss, paft_grad, paft_loss
from tsallis_jax.estimators import _weights, resample_counts

QS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _one_prompt_params(logits, phi=None):
  logits = jnp.asarray(logits, jnp.float32)[None]
  phi = jnp.zeros_like(logits) if phi is None else jnp.asarray(phi, jnp.float32)[None]
  return {"logits_BxK": logits, "phi_BxK": phi}


def _logits_with_success(p, num_traj):
  """Logits where trajectory 0 has probability p and the others share 1 - p."""
  return np.log(np.array([p] + [(1 - p) / (num_traj - 1)] * (num_traj - 1)))


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _expectation(grad_fn, params, num_samples, qs=(0.0,), extra_batch=None):
  """E over idx ~ pi^M of grad_fn(params, batch, q) for each q, by enumerating multisets; flat float64, QxD.

  q is passed traced (one compilation for all q), as a q schedule inside a jitted train step would be.
  """
  num_traj = params["logits_BxK"].shape[1]
  idx_NxG, counts_NxK = _tabular.multisets(num_traj, num_samples)
  pi_K = np.asarray(jax.nn.softmax(params["logits_BxK"][0]), np.float64)
  pmf_N = _tabular.multinomial_pmf(counts_NxK, pi_K / pi_K.sum())
  extra_batch = extra_batch or {}

  @jax.jit
  def flat_grads(idx_NxG, q_Q):
    def one(idx_G, q):
      return ravel_pytree(grad_fn(params, {"idx_BxG": idx_G[None], **extra_batch}, q))[0]
    return jax.vmap(lambda q: jax.vmap(lambda idx_G: one(idx_G, q))(idx_NxG))(q_Q)

  grads_QxNxD = np.asarray(flat_grads(jnp.asarray(idx_NxG), jnp.asarray(qs, jnp.float32)), np.float64)
  return np.einsum("n,qnd->qd", pmf_N, grads_QxNxD)


def _garl(baseline="none", normalize_by_Mq=False):
  return lambda prm, batch, q: garl_grad(_tabular.logprob_fn, prm, batch, q=q, baseline=baseline,
                                         normalize_by_Mq=normalize_by_Mq)[0]


def _true_grad(params, q, reward_BxK=None):
  return _flat(jax.grad(lambda prm: jq_loss(_tabular.log_success(prm, reward_BxK), q))(params))


# Fact 8: binary rewards, E[GARL] = rho grad l_q with rho from the binomial formula.


def test_fact8_rho_reference_values():
  np.testing.assert_allclose(_tabular.binomial_rho(0.5, 512, 0.2), 0.999019, atol=1e-6)
  np.testing.assert_allclose(_tabular.binomial_rho(1.0, 32, 0.05), 1 - 0.95 ** 32, rtol=1e-12)
  assert _tabular.binomial_rho(0.0, 32, 0.05) == pytest.approx(1.0, abs=1e-12)
  for q in (0.25, 0.5, 0.75):
    rho_M = [_tabular.binomial_rho(q, m, 0.2) for m in (32, 128, 4096)]
    assert all(r <= 1 for r in rho_M)
    limit = q * (1 - q) * 0.8 / (2 * 0.2)
    np.testing.assert_allclose(4096 * (1 - rho_M[-1]), limit, rtol=0.01)


@pytest.mark.parametrize("num_samples", [4, 12])
def test_fact8_binary_garl_expectation_is_rho_times_true_gradient(num_samples):
  p = 0.2
  params = _one_prompt_params(_logits_with_success(p, 3))
  reward = {"reward_BxK": jnp.array([[1.0, 0.0, 0.0]])}
  got = {baseline: _expectation(_garl(baseline), params, num_samples, QS, reward) for baseline in ("none", "rloo")}
  got_normalised = _expectation(_garl("none", normalize_by_Mq=True), params, num_samples, QS, reward)
  for i, q in enumerate(QS):
    expected = _tabular.binomial_rho(q, num_samples, p) * _true_grad(params, q, reward["reward_BxK"])
    np.testing.assert_allclose(got["none"][i], expected, atol=2e-6, err_msg=f"plug-in q={q}")
    if q < 1.0:
      np.testing.assert_allclose(got["rloo"][i], expected, atol=2e-6, err_msg=f"rloo q={q}")
    else:
      # The zero-success convention at q = 1 (spec 2.2): E[RLOO] = (1 - (1-P)^(M-1)) grad l_1.
      expected_rloo = (1 - (1 - p) ** (num_samples - 1)) * _true_grad(params, 1.0, reward["reward_BxK"])
      np.testing.assert_allclose(got["rloo"][i], expected_rloo, atol=2e-6, err_msg="rloo q=1")
    # Algorithms 1-2's default 1/M^q normalisation is a pure rescaling.
    np.testing.assert_allclose(got_normalised[i], expected / num_samples ** q, atol=2e-6)


# Facts 9-10: continuous weights (the pathwise term), bias ~ 1/M, E[RLOO] = E[plug-in].


def _continuous_params():
  return _one_prompt_params([0.3, -0.5, 0.1], [0.8, -1.2, -0.2])


def _leading_bias(params, q):
  """(q/P^(q+1)) [((q+1)/2) grad l_1 Var(w) - Cov(g, w)] (spec 1.6, Thm 6.1), exactly, from per-trajectory terms."""
  num_traj = params["logits_BxK"].shape[1]
  pi_K = np.asarray(jax.nn.softmax(params["logits_BxK"][0]), np.float64)
  w_K = np.asarray(jax.nn.sigmoid(params["phi_BxK"][0]), np.float64)
  p = float(pi_K @ w_K)

  def neg_log_joint(prm, k):
    logp_z, logw = _tabular.logprob_fn(prm, {"idx_BxG": jnp.array([[k]])})
    return -(logp_z + logw)[0, 0]

  g_KxD = np.stack([w_K[k] * _flat(jax.grad(neg_log_joint)(params, k)) for k in range(num_traj)])
  mean_g = pi_K @ g_KxD
  var_w = pi_K @ w_K ** 2 - p ** 2
  cov_gw = (pi_K * w_K) @ g_KxD - mean_g * p
  grad_l1 = _true_grad(params, 1.0)
  return q / p ** (q + 1) * ((q + 1) / 2 * grad_l1 * var_w - cov_gw)


def test_fact9_bias_is_zero_at_q0_and_shrinks_as_one_over_M():
  params = _continuous_params()
  sizes = (8, 16, 32)
  qs = (0.0, 0.5, 1.0)
  expectation_MxQxD = np.stack([_expectation(_garl(), params, m, qs) for m in sizes])
  for m_index in range(len(sizes)):
    np.testing.assert_allclose(expectation_MxQxD[m_index, 0], _true_grad(params, 0.0), atol=1e-6)
  for i, q in list(enumerate(qs))[1:]:
    true = _true_grad(params, q)
    bias_MxD = expectation_MxQxD[:, i] - true
    norms = np.linalg.norm(bias_MxD, axis=1)
    slope = np.polyfit(np.log(sizes), np.log(norms), 1)[0]
    assert -1.15 < slope < -0.85, f"q={q}: log-log slope of |bias| in M is {slope}"
    leading = _leading_bias(params, q)
    np.testing.assert_allclose(sizes[-1] * bias_MxD[-1], leading, atol=0.1 * np.linalg.norm(leading),
                               err_msg=f"q={q}")


def test_fact10_rloo_and_plugin_have_equal_expectations():
  params = _continuous_params()
  qs = (0.0, 0.5, 1.0)
  for num_samples in (2, 6):
    plug_in = _expectation(_garl("none"), params, num_samples, qs)
    rloo = _expectation(_garl("rloo"), params, num_samples, qs)
    np.testing.assert_allclose(rloo, plug_in, atol=1e-6)


def test_fact10_baseline_forms():
  logw_BxG = jnp.log(jnp.array([[0.1, 0.4, 0.05, 0.7], [1e-30, 1e-20, 0.0, 1e-25]]))
  w_BxG = np.exp(np.asarray(logw_BxG, np.float64))
  coef1 = _weights.garl_coefficients(logw_BxG, 1.0, baseline="rloo")
  np.testing.assert_allclose(jnp.sum(coef1["score_BxG"], axis=1), 0.0, atol=1e-5)
  coef0 = _weights.garl_coefficients(logw_BxG[:1], 0.0, baseline="rloo")
  w = w_BxG[0]
  loo = (w.sum() - w) / (len(w) - 1)
  np.testing.assert_allclose(coef0["score_BxG"][0], w - loo, atol=1e-6)
  coef_half = _weights.garl_coefficients(logw_BxG[:1], 0.5, baseline="rloo")
  np.testing.assert_allclose(coef_half["score_BxG"][0], w / np.sqrt(w.mean()) - np.sqrt(loo), rtol=1e-5)


# Fact 11: PAFT.


def _pool(num_samples, seed=0):
  params = _continuous_params()
  return params, {"idx_BxG": _tabular.sample(jax.random.key(seed), params, num_samples)}


@pytest.mark.parametrize("q", [0.5, 1.0])
def test_fact11_paft_given_pool_is_garl_plugin(q):
  params, batch = _pool(8)
  garl = _flat(garl_grad(_tabular.logprob_fn, params, batch, q=q, baseline="none")[0])
  keys = jax.random.split(jax.random.key(1), 2000)
  paft_RxD = jax.vmap(lambda k: ravel_pytree(paft_grad(_tabular.logprob_fn, params, batch, k, q=q)[0])[0])(keys)
  paft_RxD = np.asarray(paft_RxD, np.float64)
  stderr = paft_RxD.std(axis=0) / np.sqrt(len(keys))
  np.testing.assert_array_less(np.abs(paft_RxD.mean(axis=0) - garl), 5 * stderr + 1e-7)


def test_fact11_paft_variance_at_least_garl():
  params = _continuous_params()
  num_samples, num_pools, q = 8, 3000, 0.5
  idx_NxG = _tabular.sample(jax.random.key(5), {"logits_BxK": jnp.repeat(params["logits_BxK"], num_pools, 0)},
                            num_samples)
  keys = jax.random.split(jax.random.key(6), num_pools)

  @jax.jit
  def both(idx_G, key):
    batch = {"idx_BxG": idx_G[None]}
    garl = garl_grad(_tabular.logprob_fn, params, batch, q=q, baseline="none", normalize_by_Mq=False)[0]
    paft = paft_grad(_tabular.logprob_fn, params, batch, key, q=q, normalize_by_Mq=False)[0]
    return ravel_pytree(garl)[0], ravel_pytree(paft)[0]

  garl_NxD, paft_NxD = (np.asarray(x, np.float64) for x in jax.vmap(both)(idx_NxG, keys))
  var_garl, var_paft = garl_NxD.var(axis=0).sum(), paft_NxD.var(axis=0).sum()
  assert var_paft > 1.2 * var_garl, (var_paft, var_garl)
  # E[PAFT] = E[GARL] = E[plug-in] (Prop D.3), within Monte Carlo error of the difference.
  diff_NxD = paft_NxD - garl_NxD
  np.testing.assert_array_less(np.abs(diff_NxD.mean(0)), 5 * diff_NxD.std(0) / np.sqrt(num_pools) + 1e-7)


# Fact 12: endpoint reductions.


def _per_sample_neg_joint_grads(params, batch):
  """-grad log p(z_m, y*|x) for each sample m, and w_m, computed one sample at a time."""
  def neg_joint(prm, m):
    logp_z, logw = _tabular.logprob_fn(prm, batch)
    return -(logp_z[0, m] + logw[0, m])
  num_samples = batch["idx_BxG"].shape[1]
  f_GxD = np.stack([_flat(jax.grad(neg_joint)(params, m)) for m in range(num_samples)])
  w_G = np.exp(np.asarray(_tabular.logprob_fn(params, batch)[1][0], np.float64))
  return f_GxD, w_G


class EndpointTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fact12_endpoints(self):
    params, batch = _pool(6, seed=3)
    f_GxD, w_G = _per_sample_neg_joint_grads(params, batch)
    garl_fn = self.variant(lambda prm, b, q: garl_grad(_tabular.logprob_fn, prm, b, q=q, baseline="none",
                                                       normalize_by_Mq=False)[0])
    garl = lambda q: _flat(garl_fn(params, batch, jnp.float32(q)))
    np.testing.assert_allclose(garl(0.0), (w_G[:, None] * f_GxD).mean(0), atol=1e-6)
    np.testing.assert_allclose(garl(1.0), (w_G[:, None] * f_GxD).sum(0) / w_G.sum(), atol=1e-6)
    key = jax.random.key(9)
    counts_G = np.asarray(resample_counts(key, jnp.log(jnp.asarray(w_G))[None], 6)[0], np.float64)
    sft = counts_G @ f_GxD / counts_G.sum()
    paft_fn = self.variant(lambda prm, b, k, q: paft_grad(_tabular.logprob_fn, prm, b, k, q=q,
                                                          normalize_by_Mq=False)[0])
    paft = lambda q: _flat(paft_fn(params, batch, key, jnp.float32(q)))
    np.testing.assert_allclose(paft(1.0), sft, atol=1e-6)
    np.testing.assert_allclose(paft(0.0), w_G.mean() * sft, atol=1e-6)


# Fact 13: effective reward.


def test_fact13_effective_reward_at_most_Mq():
  num_samples = 8
  logw_BxG = -jnp.abs(jax.random.normal(jax.random.key(0), (5, num_samples)) * 5)  # weights in (0, 1]
  single_BxG = jnp.full((1, num_samples), -jnp.inf).at[0, 3].set(0.0)  # one success
  for q in QS:
    coef = _weights.garl_coefficients(logw_BxG, q, baseline="none")
    assert float(jnp.max(coef["path_BxG"])) <= num_samples ** q * (1 + 1e-5)
    aux = _weights.weight_metrics(logw_BxG, q)
    assert 0.0 <= float(aux["jq/max_c_over_Mq"]) <= 1.0 + 1e-6
    single = _weights.garl_coefficients(single_BxG, q, baseline="none")
    np.testing.assert_allclose(single["path_BxG"][0, 3], num_samples ** q, rtol=1e-5)
    np.testing.assert_allclose(_weights.weight_metrics(single_BxG, q)["jq/max_c_over_Mq"], 1.0, rtol=1e-5)


def test_weight_metrics_against_numpy():
  w_BxG = np.array([[0.1, 0.4, 0.05, 0.7], [0.0, 0.0, 0.0, 0.0], [1e-3, 0.0, 0.0, 2e-3]])
  q = 0.75
  aux = _weights.weight_metrics(jnp.log(jnp.asarray(w_BxG, jnp.float32)), q)
  wbar_B = w_BxG.mean(1)
  success = wbar_B > 0
  amp_B = wbar_B[success] ** -q
  ess_B = w_BxG[success].sum(1) ** 2 / (w_BxG[success] ** 2).sum(1)
  np.testing.assert_allclose(aux["weight/mean"], wbar_B.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["jq/amp_mean"], amp_B.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["jq/amp_max"], amp_B.max(), rtol=1e-5)
  np.testing.assert_allclose(aux["jq/log_amp_mean"], np.log(amp_B).mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["jq/weight_ess"], ess_B.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["groups/frac_zero_success"], 1 / 3)
  max_c_B = np.where(success, w_BxG.max(1) / np.where(success, wbar_B, 1) ** q / 4 ** q, 0.0)
  np.testing.assert_allclose(aux["jq/max_c_over_Mq"], max_c_B.mean(), rtol=1e-5)
  # P-hat far below float32's range: the amplification saturates instead of overflowing.
  huge = _weights.weight_metrics(jnp.full((2, 4), -400.0), 1.0)
  chex.assert_tree_all_finite(huge)
  np.testing.assert_allclose(huge["jq/log_amp_mean"], 400.0, rtol=1e-6)


# Fact 14: zero-success groups.


class ZeroSuccessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_exact_zero_gradient_every_estimator_every_q(self):
    params = _tabular.init_params(jax.random.key(0), 2, 3)
    batch = {"idx_BxG": jnp.array([[0, 1, 2, 1], [2, 2, 0, 1]]), "reward_BxK": jnp.array([[0., 0, 0], [0., 0, 0]])}
    zeros = jax.tree.map(jnp.zeros_like, params)
    garl = {baseline: self.variant(lambda prm, b, q, baseline=baseline: garl_grad(
        _tabular.logprob_fn, prm, b, q=q, baseline=baseline)) for baseline in ("rloo", "none")}
    paft = self.variant(lambda prm, b, key, q: paft_grad(_tabular.logprob_fn, prm, b, key, q=q))
    for q in (0.0, 0.5, 1.0):
      q = jnp.float32(q)  # traced under jit: one compilation for every q
      for baseline in ("rloo", "none"):
        grads, aux = garl[baseline](params, batch, q)
        chex.assert_trees_all_equal(grads, zeros)
        chex.assert_tree_all_finite(aux)
        assert float(aux["groups/frac_zero_success"]) == 1.0
      grads, aux = paft(params, batch, jax.random.key(1), q)
      chex.assert_trees_all_equal(grads, zeros)
      chex.assert_tree_all_finite(aux)
    grads, aux = self.variant(functools.partial(grpo_grad, _tabular.logprob_fn, rewards_BxG=jnp.zeros((2, 4))))(
        params, batch)
    chex.assert_trees_all_equal(grads, zeros)
    chex.assert_tree_all_finite(aux)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mixed_batch_and_gradient_through_minus_inf(self):
    """The zero group's inputs get zero, finite cotangents (double where); the other group is untouched."""
    logp_z_BxG = jnp.log(jnp.array([[0.2, 0.3, 0.1], [0.5, 0.1, 0.2]]))
    logw_BxG = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [0.0, -jnp.inf, -1e-3]])
    for q in (0.0, 0.5, 1.0):
      for baseline in ("rloo", "none"):
        loss_fn = lambda a, b: garl_loss(a, b, q=q, baseline=baseline)[0]
        loss, (d_logp, d_logw) = self.variant(jax.value_and_grad(loss_fn, argnums=(0, 1)))(logp_z_BxG, logw_BxG)
        chex.assert_tree_all_finite((loss, d_logp, d_logw))
        np.testing.assert_array_equal(d_logp[0], 0.0)
        np.testing.assert_array_equal(d_logw[0], 0.0)
        assert np.any(d_logp[1] != 0)
      loss_fn = lambda a, b: paft_loss(a, b, jax.random.key(0), q=q)[0]
      loss, (d_logp, d_logw) = self.variant(jax.value_and_grad(loss_fn, argnums=(0, 1)))(logp_z_BxG, logw_BxG)
      chex.assert_tree_all_finite((loss, d_logp, d_logw))
      np.testing.assert_array_equal(d_logp[0], 0.0)
      np.testing.assert_array_equal(d_logw[1, 1], 0.0)


def test_tiny_weights_and_traced_q():
  logw_BxG = jnp.log(jnp.array([[1e-30, 1e-35, 2e-30, 1e-31]], jnp.float32)) + jnp.array([[0., -1e3, -50., -200.]])
  logp_z_BxG = jnp.full((1, 4), -3.0)

  @jax.jit
  def grads(q):
    return jax.grad(lambda a, b: garl_loss(a, b, q=q)[0] + paft_loss(a, b, jax.random.key(0), q=q)[0],
                    argnums=(0, 1))(logp_z_BxG, logw_BxG)

  for q in (0.0, 0.3, 1.0):
    chex.assert_tree_all_finite(grads(jnp.float32(q)))
  # At q = 1 the weights are self-normalised: the gradient does not depend on their overall scale.
  shifted = jax.grad(lambda b: garl_loss(logp_z_BxG, b, q=1.0)[0])(logw_BxG + 60.0)
  np.testing.assert_allclose(jax.grad(lambda b: garl_loss(logp_z_BxG, b, q=1.0)[0])(logw_BxG), shifted,
                             rtol=1e-5)


# Fact 15: GRPO.


def test_fact15_grpo_factor_reference_values():
  for p, factor in ((1e-3, 5.52), (0.2, 2.434), (0.5, 1.968)):
    assert _tabular.grpo_factor(32, p) == pytest.approx(factor, abs=0.005)


@pytest.mark.parametrize("p", [1e-3, 0.2, 0.5])
def test_fact15_grpo_expected_direction(p):
  num_samples = 32
  params = _one_prompt_params(_logits_with_success(p, 2))
  reward_BxK = jnp.array([[1.0, 0.0]])

  def grpo(prm, batch, unused_q):
    rewards_BxG = (batch["idx_BxG"] == 0).astype(jnp.float32)
    return grpo_grad(_tabular.logprob_fn, prm, batch, rewards_BxG=rewards_BxG, std_ddof=0, std_eps=0.0,
                     loss_type="seq_sum")[0]

  got = _expectation(grpo, params, num_samples)[0]
  true_grad_p = -_true_grad(params, 0.0, reward_BxK)  # grad P, since l_0 = 1 - P
  np.testing.assert_allclose(-got, _tabular.grpo_factor(num_samples, p) * true_grad_p,
                             rtol=1e-4, atol=1e-4 * np.abs(true_grad_p).max())


def test_dr_grpo_is_scaled_binary_rloo_at_q0():
  params, batch = _pool(8, seed=4)
  rewards_BxG = (batch["idx_BxG"] == 0).astype(jnp.float32)
  dr = _flat(grpo_grad(_tabular.logprob_fn, params, batch, rewards_BxG=rewards_BxG, scale_rewards="none",
                       loss_type="seq_sum")[0])
  binary = {**batch, "reward_BxK": jnp.array([[1.0, 0.0, 0.0]])}
  rloo = _flat(garl_grad(_tabular.logprob_fn, params, binary, q=0.0, baseline="rloo")[0])
  np.testing.assert_allclose(dr, (8 - 1) / 8 * rloo, atol=1e-6)
