"""Spec section 3, facts 1-3: the q-logarithm, J_Q and the amplification P^-q."""
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _tabular
from tsallis_jax import amplification, jq_loss, q_log, validate_q_schedule


def _qlog_reference(u, q):
  u = np.asarray(u, np.float64)
  return np.log(u) if q == 1.0 else (u ** (1.0 - q) - 1.0) / (1.0 - q)


class QLogTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_definition(self):
    u = np.array([1e-6, 1e-3, 0.05, 0.3, 0.7, 0.99, 1.0], np.float32)
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
      got = self.variant(q_log)(u, q)
      np.testing.assert_allclose(got, _qlog_reference(u, q), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_traced_q(self):
    u = np.array([0.01, 0.5], np.float32)
    for q in (0.0, 0.3, 1.0):
      got = self.variant(q_log)(u, jnp.float32(q))
      np.testing.assert_allclose(got, _qlog_reference(u, q), rtol=1e-5)


def test_fact1_limit_and_endpoints():
  assert abs(float(q_log(0.3, 1.0 - 1e-6)) - np.log(0.3)) < 1e-5
  for q in (1.0 - 1e-3, 1.0 - 1e-5, 1.0):
    np.testing.assert_allclose(q_log(0.3, q), _qlog_reference(0.3, q), rtol=1e-6)
  p = np.linspace(0.01, 1.0, 7, dtype=np.float32)
  np.testing.assert_allclose(q_log(p, 0.0), p - 1.0, atol=1e-6)
  for q in (0.0, 0.5, 1.0):
    assert float(q_log(1.0, q)) == 0.0


def test_fact1_neg_qlog_convex():
  second = jax.vmap(jax.grad(jax.grad(lambda u, q: -q_log(u, q))), in_axes=(0, None))
  u = jnp.linspace(0.02, 1.0, 25)
  for q in (0.25, 0.5, 1.0):
    assert np.all(np.asarray(second(u, q)) > 0)
    np.testing.assert_allclose(second(u, q), q * np.asarray(u, np.float64) ** (-q - 1), rtol=1e-4)


def test_fact2_derivative_and_gradient_ratios():
  p = jnp.array([0.003, 0.2, 0.9])
  for q in (0.0, 0.5, 1.0):
    np.testing.assert_allclose(jax.vmap(jax.grad(q_log), in_axes=(0, None))(p, q), np.asarray(p) ** -q,
                               rtol=1e-5)
  params = _tabular.init_params(jax.random.key(3), 1, 5)
  loss = lambda prm, q: jq_loss(_tabular.log_success(prm), q)
  p_val = float(jnp.exp(_tabular.log_success(params))[0])
  grad0 = jax.grad(loss)(params, 0.0)
  grad1 = jax.grad(loss)(params, 1.0)
  for q in (0.25, 0.75):
    grad_q = jax.grad(loss)(params, q)
    chex.assert_trees_all_close(grad_q, jax.tree.map(lambda g: g * p_val ** -q, grad0), rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(grad_q, jax.tree.map(lambda g: g * p_val ** (1 - q), grad1), rtol=1e-4,
                                atol=1e-7)


def test_fact3_per_example_amplification_ratio():
  log_p = jnp.log(jnp.array([0.01, 0.5]))
  amp = amplification(log_p, 0.75)
  np.testing.assert_allclose(amp[0] / amp[1], 50 ** 0.75, rtol=1e-5)
  assert abs(float(amp[0] / amp[1]) - 18.8) < 0.05


@pytest.mark.parametrize("learning_rate", [1e-3, 7.0])
def test_fact3_amplification_ratio_of_sgd_updates_is_invariant_to_the_learning_rate(learning_rate):
  """Fact 3 measured on parameter updates: two examples with their own softmax logits (K = 5 trajectories, one
  correct, P_a = 0.01 and P_b = 0.5 by construction), one optax SGD step on the batch J_Q loss. The update of
  example a relative to q = 0, over the same for b, is (P_a / P_b)^-q = 50^0.75 = 18.8 at every learning rate;
  an Adam step, which normalises each coordinate, loses it (spec 1.5: Adam cannot substitute for q)."""
  from tsallis_jax.theory import softmax_toy_init
  theta_BxK = jnp.stack([softmax_toy_init(p0, num_trajectories=5) for p0 in (0.01, 0.5)]).astype(jnp.float32)
  log_p_fn = lambda theta: jax.nn.log_softmax(theta, axis=-1)[:, 0]
  np.testing.assert_allclose(np.exp(log_p_fn(theta_BxK)), [0.01, 0.5], rtol=1e-5)

  def update_norms(q, tx):
    grads = jax.grad(lambda theta: jq_loss(log_p_fn(theta), q))(theta_BxK)
    updates, _ = tx.update(grads, tx.init(theta_BxK), theta_BxK)
    return np.linalg.norm(np.asarray(updates, np.float64), axis=1)

  sgd = optax.sgd(learning_rate)
  norm_q, norm_0 = update_norms(0.75, sgd), update_norms(0.0, sgd)
  np.testing.assert_allclose((norm_q[0] / norm_0[0]) / (norm_q[1] / norm_0[1]), 50 ** 0.75, rtol=1e-4)
  adam = optax.adam(learning_rate)
  norm_q, norm_0 = update_norms(0.75, adam), update_norms(0.0, adam)
  np.testing.assert_allclose((norm_q[0] / norm_0[0]) / (norm_q[1] / norm_0[1]), 1.0, rtol=1e-3)


def test_jq_loss_tiny_and_zero_p():
  log_p = jnp.array([np.log(1e-30), -1e4, -jnp.inf, 0.0], jnp.float32)
  for q in (0.0, 0.5, 1.0 - 1e-7):
    value, grad = jax.value_and_grad(jq_loss)(log_p, q)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    one_minus_q = 1.0 - float(np.float32(q))
    reference = [np.expm1(one_minus_q * x) / one_minus_q for x in (np.log(1e-30), -1e4, -np.inf, 0.0)]
    np.testing.assert_allclose(value, -np.mean(reference), rtol=1e-4)
  value, grad = jax.value_and_grad(jq_loss)(log_p[:2], 1.0)
  np.testing.assert_allclose(value, (np.log(1e30) + 1e4) / 2, rtol=1e-6)
  np.testing.assert_allclose(grad, [-0.5, -0.5])
  assert float(jq_loss(jnp.array([-jnp.inf]), 1.0)) == np.inf


@pytest.mark.parametrize("bad_q", [-0.1, 1.01, float("nan"), np.float32(2.0)])
def test_q_outside_unit_interval_raises(bad_q):
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    q_log(0.5, bad_q)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    jq_loss(jnp.zeros(2), bad_q)


def test_schedule_validation():
  validate_q_schedule(lambda step: min(1.0, step / 10), range(20))
  with pytest.raises(ValueError, match="step 11"):
    validate_q_schedule(lambda step: step / 10, range(20))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    log_p=st.lists(st.one_of(st.floats(-1e30, 0.0), st.just(-np.inf)), min_size=4, max_size=4),
    q=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])))
def test_property_no_nan(log_p, q):
  log_p = jnp.asarray(log_p, jnp.float32)
  value, grad = jax.value_and_grad(jq_loss)(log_p, q)
  assert not np.isnan(value)
  assert not np.any(np.isnan(grad))
  assert not np.any(np.isnan(q_log(jnp.exp(log_p), q)))


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("log_p", [-10.0, -20.0, -60.0])
def test_jq_loss_gradient_is_accurate_for_tiny_p(q, log_p):
  """d(-ln_q P)/d log P = -P^(1-q) to float32 relative precision even when P^(1-q) is ~1e-26 (cold start)."""
  grad = jax.grad(lambda lp: jq_loss(lp, q))(jnp.float32(log_p))
  exact = -np.exp((1.0 - q) * log_p)
  np.testing.assert_allclose(float(grad), exact, rtol=1e-5)


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("jit", [False, True])
def test_q_log_gradient_is_finite_at_zero_and_subnormal_u(q, jit):
  """d ln_q(u)/du = u^-q (spec 1.4): exact where float32 holds it, saturating at the largest float32 where it does
  not (u = 0 with q > 0, where the derivative is +inf; subnormal u, which XLA on CPU may read as 0), never NaN."""
  u = jnp.array([0.0, 1e-45, 1e-30, 0.5, 1.0], jnp.float32)
  grad_fn = jax.vmap(jax.grad(q_log), in_axes=(0, None))
  grad = np.asarray((jax.jit(grad_fn) if jit else grad_fn)(u, q), np.float64)
  assert np.all(np.isfinite(grad)), grad
  exact = np.asarray(u, np.float64)[2:] ** -q
  np.testing.assert_allclose(grad[2:], exact, rtol=1e-5)
  float_max = float(np.finfo(np.float32).max)
  if q == 0.0:
    np.testing.assert_allclose(grad[:2], 1.0, rtol=1e-6)  # ln_0(u) = u - 1
  else:
    assert grad[0] == float_max
    # The true derivative at u = 1e-45 is 1e45^q (above float32's range for q = 1); never below it, or the max.
    assert grad[1] >= min(1e45 ** q, float_max) * (1 - 1e-3), grad[1]
