"""Estimator bias on the toys (spec 1.6, 2.4; facts 8-9) and the SGD escape bridge (spec 1.5 meets 1.6)."""
import jax
import numpy as np
import pytest

from tsallis_jax import theory
from tsallis_jax.theory import sgd


def test_binary_shrinkage_spec_values():
  assert theory.binary_shrinkage(0.5, 32, 0.2) == pytest.approx(0.98286, abs=1e-5)
  assert theory.binary_shrinkage(0.5, 128, 0.2) == pytest.approx(0.99602, abs=1e-5)
  assert theory.binary_shrinkage(0.5, 512, 0.2) == pytest.approx(0.999019, abs=1e-6)
  assert theory.binary_shrinkage(0.75, 32, 0.05) == pytest.approx(0.830, abs=1e-3)
  assert theory.binary_shrinkage(1.0, 32, 0.05) == pytest.approx(1.0 - 0.95 ** 32, rel=1e-12)
  assert theory.binary_shrinkage(0.0, 7, 0.3) == pytest.approx(1.0, rel=1e-12)
  for q in (0.25, 0.5, 0.75):
    assert theory.binary_shrinkage(q, 16, 0.1) < 1.0


@pytest.mark.parametrize("q,p", [(0.5, 0.2), (0.25, 0.05), (0.75, 0.5)])
def test_delta_method_limit(q, p):
  """Fact 8: M (1 - rho) -> q(1-q)(1-P)/(2P) as M grows."""
  limit = q * (1.0 - q) * (1.0 - p) / (2.0 * p)
  assert 20_000 * (1.0 - theory.binary_shrinkage(q, 20_000, p)) == pytest.approx(limit, rel=1e-2)
  assert 20_000 * (1.0 - theory.delta_method_shrinkage(q, 20_000, p)) == pytest.approx(limit, rel=1e-9)


def _binary_toy(p):
  params = theory.binary_toy_params(theory.softmax_toy_init(p, num_trajectories=6, num_correct=2))
  return params, np.arange(6) < 2


@pytest.mark.parametrize("estimator", ["garl_plugin", "garl_rloo", "paft"])
def test_measured_binary_bias_is_the_exact_shrinkage(estimator):
  params, correct_K = _binary_toy(0.2)
  result = theory.measure_bias(estimator, 0.5, 8, params=params, correct_K=correct_K, key=jax.random.key(0),
                               num_replicates=20_000, num_chunks=20)
  expected = theory.binary_shrinkage(0.5, 8, result["P"])
  assert abs(result["rho"] - expected) < 4 * result["rho_se"] + 1e-4
  assert 1.0 - result["rho"] > 10 * result["rho_se"]  # the bias is resolved, not noise
  assert result["perp_rel"] < 0.01  # binary bias is parallel to the true gradient (spec 2.4)


def test_rloo_and_plugin_differ_at_q1_with_zero_success_groups():
  params, correct_K = _binary_toy(0.2)
  p = float(np.exp(theory.binary_toy_log_success(params, correct_K)))
  for estimator, expected in (("garl_plugin", 1 - (1 - p) ** 4), ("garl_rloo", 1 - (1 - p) ** 3)):
    result = theory.measure_bias(estimator, 1.0, 4, params=params, correct_K=correct_K, key=jax.random.key(1),
                                 num_replicates=20_000, num_chunks=20)
    assert abs(result["rho"] - expected) < 4 * result["rho_se"] + 1e-4, estimator


def test_binary_bias_slope_in_M_is_minus_one():
  params, correct_K = _binary_toy(0.2)
  sizes_M = np.array([32, 128])  # MP >= 6: past the pre-asymptotic regime (exact slope -1.05 here)
  gaps = [1.0 - theory.measure_bias("garl_plugin", 0.5, int(m), params=params, correct_K=correct_K,
                                    key=jax.random.key(2), num_replicates=40_000, num_chunks=20)["rho"]
          for m in sizes_M]
  assert theory.log_log_slope(sizes_M, gaps) == pytest.approx(-1.0, abs=0.2)


def test_likelihood_bias_matches_thm_6_1_coefficient():
  params = theory.likelihood_toy_init(0.2, num_trajectories=6, num_correct=2, correct_weight=0.6,
                                      wrong_weight_ratio=0.3)
  coefficient_D = theory.likelihood_bias_coefficient(params, 0.5)
  result = theory.measure_bias("garl_plugin", 0.5, 64, params=params, toy="likelihood", key=jax.random.key(3),
                               num_replicates=40_000, num_chunks=20)
  scaled_D = 64 * result["bias_D"]
  cosine = scaled_D @ coefficient_D / np.linalg.norm(scaled_D) / np.linalg.norm(coefficient_D)
  assert cosine > 0.99
  assert np.linalg.norm(scaled_D) / np.linalg.norm(coefficient_D) == pytest.approx(1.0, abs=0.1)


def test_bias_bad_arguments():
  params, correct_K = _binary_toy(0.2)
  with pytest.raises(ValueError, match="estimator must be one of"):
    theory.measure_bias("reinforce", 0.5, 8, params=params, correct_K=correct_K, key=jax.random.key(0))
  with pytest.raises(ValueError, match="correct_K"):
    theory.measure_bias("garl_plugin", 0.5, 8, params=params, key=jax.random.key(0))
  with pytest.raises(ValueError, match="q must lie in"):
    theory.binary_shrinkage(1.5, 8, 0.2)
  with pytest.raises(ValueError, match="num_samples"):
    theory.binary_shrinkage(0.5, 0, 0.2)


def test_sgd_unnormalised_garl_escapes_faster_at_higher_q():
  """Eq. 12 as written (no 1/M^q) discretises the flow: the median steps to escape fall as q rises."""
  medians = [np.median(theory.sgd_escape_steps("garl", q, 1e-2, num_samples=8, normalize_by_Mq=False,
                                               num_seeds=8, max_steps=3000)) for q in (0.0, 0.5, 1.0)]
  assert medians[0] > medians[1] > medians[2], medians
  assert medians[0] < 3000


def test_sgd_is_deterministic_and_capped():
  capped = theory.sgd_escape_steps("garl", 0.0, 1e-3, num_samples=8, normalize_by_Mq=False, num_seeds=8,
                                   max_steps=7)
  np.testing.assert_array_equal(capped, 7)
  again = theory.sgd_escape_steps("garl", 1.0, 1e-2, num_samples=8, normalize_by_Mq=False, num_seeds=8, seed=5)
  np.testing.assert_array_equal(again, theory.sgd_escape_steps("garl", 1.0, 1e-2, num_samples=8,
                                                               normalize_by_Mq=False, num_seeds=8, seed=5))


@pytest.mark.parametrize("kwargs,match", [
  (dict(method="sgd"), "method must be one of"),
  (dict(reward="dense"), "reward must be one of"),
  (dict(q=2.0), "q must lie in"),
  (dict(p0=0.6), "p0 must lie in"),
  (dict(num_samples=1), "num_samples"),
])
def test_sgd_bad_arguments(kwargs, match):
  args = {"method": "garl", "q": 0.5, "p0": 1e-2, "num_samples": 8, **kwargs}
  with pytest.raises(ValueError, match=match):
    sgd.sgd_escape_steps(args.pop("method"), args.pop("q"), args.pop("p0"), **args)
