"""Escort minimiser, dispersion penalty (spec 1.3, facts 4-5) and the label-noise toy (spec 1.5, 2.8, fact 16)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from tsallis_jax import theory


def _minimise_categorical(alpha_N, q):
  """Direct numerical minimisation of sum alpha (-ln_q theta) over softmax logits, with jq's own code."""
  value_and_grad = jax.jit(jax.value_and_grad(lambda phi: theory.categorical_qloss(jax.nn.log_softmax(phi),
                                                                                     alpha_N, q)))
  fun = lambda phi: tuple(np.asarray(x, np.float64) for x in value_and_grad(jnp.asarray(phi, jnp.float32)))
  result = scipy.optimize.minimize(fun, np.zeros(len(alpha_N)), jac=True, method="L-BFGS-B",
                                   options=dict(gtol=1e-9, ftol=1e-12, maxiter=2000))
  return np.asarray(jax.nn.softmax(jnp.asarray(result.x)))


def test_escort_spec_values():
  alpha = np.array([0.6, 0.3, 0.1])
  np.testing.assert_allclose(theory.escort_minimiser(alpha, 0.5), [0.78261, 0.19565, 0.02174], atol=1e-5)
  np.testing.assert_allclose(theory.escort_minimiser(alpha, 0.25), [0.94049, 0.05878, 0.00073], atol=1e-5)
  np.testing.assert_allclose(theory.escort_minimiser(alpha, 1.0), alpha, rtol=1e-12)
  np.testing.assert_array_equal(theory.escort_minimiser(alpha, 0.0), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(theory.escort_minimiser([0.4, 0.4, 0.2], 0.0), [0.5, 0.5, 0.0])


@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 1.0])
def test_escort_matches_direct_minimisation(q):
  rng = np.random.default_rng(int(q * 100))
  for _ in range(3):
    alpha_N = rng.dirichlet(np.ones(5)) + 0.02
    alpha_N /= alpha_N.sum()
    np.testing.assert_allclose(_minimise_categorical(alpha_N, q), theory.escort_minimiser(alpha_N, q), atol=2e-4)


def test_escort_sharpens_monotonically_and_alpha_is_not_a_minimiser_below_q1():
  alpha_N = np.array([0.5, 0.3, 0.15, 0.05])
  for q in (0.3, 0.6, 0.9):
    theta_N = theory.escort_minimiser(alpha_N, q)
    np.testing.assert_allclose(theta_N[0] / theta_N[1:], (alpha_N[0] / alpha_N[1:]) ** (1.0 / q), rtol=1e-10)
    loss = lambda t: float(theory.categorical_qloss(jnp.log(jnp.asarray(t, jnp.float32)), alpha_N, q))
    assert loss(theta_N) < loss(alpha_N)  # Cor B.3: the q-log scoring rule is improper for q < 1
  modes = [theory.escort_minimiser(alpha_N, q)[0] for q in (1.0, 0.75, 0.5, 0.25, 0.1)]
  assert all(a < b for a, b in zip(modes[:-1], modes[1:]))


def test_q0_minimiser_is_the_mode_vertex():
  alpha_N = np.array([0.2, 0.5, 0.3])
  vertex_loss = float(theory.categorical_qloss(jnp.log(jnp.asarray(theory.escort_minimiser(alpha_N, 0.0))),
                                               alpha_N, 0.0))
  rng = np.random.default_rng(0)
  for theta_N in rng.dirichlet(np.ones(3), size=50):
    assert vertex_loss <= float(theory.categorical_qloss(jnp.log(jnp.asarray(theta_N, jnp.float32)), alpha_N, 0.0))


@pytest.mark.parametrize("alpha,match", [([0.5, -0.1, 0.6], "strictly positive"), ([1.0, 0.0], "strictly positive"),
                                         ([[0.5, 0.5]], "1-D"), ([1.0], "1-D")])
def test_escort_bad_alpha(alpha, match):
  with pytest.raises(ValueError, match=match):
    theory.escort_minimiser(alpha, 0.5)
  with pytest.raises(ValueError, match="q must lie in"):
    theory.escort_minimiser([0.5, 0.5], 1.5)


def test_dispersion_penalty_is_nonnegative_zero_iff_constant_and_zero_at_q0():
  rng = np.random.default_rng(1)
  for _ in range(20):
    log_p_D = jnp.log(jnp.asarray(rng.uniform(0.01, 0.9, size=16), jnp.float32))
    for q in (0.25, 0.5, 1.0):
      assert float(theory.dispersion_penalty(log_p_D, q)) > 0
    assert abs(float(theory.dispersion_penalty(log_p_D, 0.0))) < 1e-6
  constant_D = jnp.full((8,), math.log(0.3), jnp.float32)
  assert abs(float(theory.dispersion_penalty(constant_D, 0.5))) < 1e-6


@pytest.mark.parametrize("q", [0.25, 0.5, 1.0])
def test_dispersion_second_order(q):
  rng = np.random.default_rng(2)
  for spread, tol in ((0.02, 0.05), (0.005, 0.02)):
    p_D = 0.3 + spread * rng.standard_normal(64)
    log_p_D = jnp.log(jnp.asarray(p_D, jnp.float32))
    excess = float(theory.dispersion_penalty(log_p_D, q))
    assert excess == pytest.approx(float(theory.dispersion_second_order(log_p_D, q)), rel=tol)


def test_dispersion_minimum_at_fixed_mean_is_constant():
  """Direct minimisation of J_Q over datasets with a fixed mean P-bar = 0.3 lands on the constant dataset."""
  def loss(x_D):
    p_D = 0.3 + 0.2 * jnp.tanh(x_D - jnp.mean(x_D))
    p_D = p_D - jnp.mean(p_D) + 0.3
    return theory.dispersion_penalty(jnp.log(p_D), 0.5)
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  fun = lambda x: tuple(np.asarray(v, np.float64) for v in value_and_grad(jnp.asarray(x, jnp.float32)))
  x0 = np.random.default_rng(3).standard_normal(6)
  result = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B")
  assert result.fun < 1e-6 < float(loss(jnp.asarray(x0, jnp.float32)))


# --- label-noise toy ---------------------------------------------------------------------------------------------

def test_noise_equilibrium_spec_values():
  assert theory.noise_equilibrium(1.0, 0.1) == pytest.approx(0.1, rel=1e-12)
  assert theory.noise_equilibrium(0.5, 0.1) == pytest.approx(0.012195, rel=1e-4)
  assert theory.noise_equilibrium(0.25, 0.1) == pytest.approx(1.524e-4, rel=1e-3)
  assert theory.noise_equilibrium(0.0, 0.1) == 0.0


@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.2])
def test_noise_equilibrium_is_the_escort(epsilon):
  for q in (0.25, 0.5, 0.75, 1.0):
    exact = theory.noise_equilibrium(q, epsilon)
    assert exact == pytest.approx(theory.escort_minimiser([1.0 - epsilon, epsilon], q)[1], rel=1e-10)
    assert theory.noise_equilibrium_numerical(q, epsilon) == pytest.approx(exact, rel=1e-3)
    times_T, contamination_T = theory.simulate_noise_flow(q, epsilon=epsilon)
    assert contamination_T[-1] == pytest.approx(exact, rel=1e-3)
    assert np.all(np.diff(contamination_T) >= -1e-3 * exact)  # rises to p~*, then float32 jitter only
    assert times_T[0] == 0.0


def test_autograd_drift_matches_eq16():
  for q in (0.0, 0.5, 1.0):
    c_X = np.array([1e-3, 1e-2, 0.05, 0.3])
    expected = (0.1 * c_X ** -q - 0.9 * (1.0 - c_X) ** -q) * (1.0 - c_X) ** 2 * 4.0
    np.testing.assert_allclose(theory.noise_drift(c_X, q, 0.1, score_norm=2.0), expected, rtol=1e-4)


def test_q0_contamination_only_decreases():
  _, contamination_T = theory.simulate_noise_flow(0.0, epsilon=0.1, t_end=5e-7, contamination0=1e-6)
  assert np.all(np.diff(contamination_T) < 0)
  assert math.isinf(theory.noise_time_to_contamination(0.0, 1e-3, epsilon=0.1))
  assert math.isinf(theory.simulate_noise_time(0.0, 1e-3, epsilon=0.1))


@pytest.mark.parametrize("q", [0.25, 0.5, 1.0])
def test_noise_time_flow_matches_quadrature(q):
  for eta in (1e-4, 1e-3):
    if eta >= theory.noise_equilibrium(q, 0.1):
      assert math.isinf(theory.simulate_noise_time(q, eta, epsilon=0.1))
      continue
    start = 1e-3 * eta
    reference = theory.noise_time_to_contamination(q, eta, epsilon=0.1, contamination0=start)
    assert theory.simulate_noise_time(q, eta, epsilon=0.1, contamination0=start) == pytest.approx(reference,
                                                                                                  rel=1e-3)


@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 1.0])
def test_noise_time_early_phase_law(q):
  """Fact 16: T(eta) (q+1) eps c^2 / eta^(q+1) -> 1 as eta -> 0; T scales as 1/c^2.

  The gap closes like (eta/p~*)^q, slowly at small q, so eta is taken relative to the equilibrium.
  """
  gaps = []
  for eta in theory.noise_equilibrium(q, 0.1) * np.array([1e-2, 1e-5, 1e-8]):
    ratio = (theory.noise_time_to_contamination(q, eta, epsilon=0.1)
             / theory.noise_time_asymptotic(q, eta, epsilon=0.1))
    gaps.append(abs(ratio - 1.0))
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05
  t1 = theory.noise_time_to_contamination(q, 1e-6, epsilon=0.1)
  assert theory.noise_time_to_contamination(q, 1e-6, epsilon=0.1, score_norm=3.0) == pytest.approx(t1 / 9.0)


@pytest.mark.parametrize("kwargs,match", [
  (dict(q=0.5, eta=1e-3, epsilon=0.5), "epsilon"),
  (dict(q=0.5, eta=1e-3, epsilon=0.0), "epsilon"),
  (dict(q=1.2, eta=1e-3, epsilon=0.1), "q must lie in"),
  (dict(q=0.5, eta=0.0, epsilon=0.1), "eta must lie in"),
  (dict(q=0.5, eta=1e-3, epsilon=0.1, score_norm=0.0), "score_norm"),
])
def test_noise_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    theory.noise_time_to_contamination(**kwargs)
  with pytest.raises(ValueError, match=match):
    theory.simulate_noise_time(**kwargs)
