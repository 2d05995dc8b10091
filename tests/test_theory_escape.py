"""Escape times of the toy models (spec 1.5, 2.7; acceptance facts 6-7): closed forms, series, flow, slopes."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from tsallis_jax import theory
from tsallis_jax.theory import escape

Q_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)

# Spec 2.7 reference table: delta = 1/2, p0 = 0.01, C = 1 (derived there by LSODA, quadrature and closed forms).
SPEC_TABLE = {
  2: {0.0: 54.090069, 0.5: 10.413946, 0.75: 5.154609, 1.0: 2.792509},
  5: {0.0: 86.544111, 0.5: 16.662313, 0.75: 8.247374, 1.0: 4.468015},
  50: {0.0: 106.016536, 0.5: 20.411333, 0.75: 10.103033, 1.0: 5.473318},
}


def _quad_integral(q, p0, delta):
  """I_q by adaptive quadrature, split at decades so the u^(q-2) peak near p0 is resolved."""
  edges = np.unique(np.concatenate([[p0], np.geomspace(p0, delta, 12), [delta]]))
  integrand = lambda u: u ** (q - 2.0) * (1.0 - u) ** -2.0
  return math.fsum(integrate.quad(integrand, a, b, epsabs=0.0, epsrel=1e-13, limit=200)[0]
                   for a, b in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("num_trajectories", sorted(SPEC_TABLE))
def test_spec_reference_table(num_trajectories):
  for q, expected in SPEC_TABLE[num_trajectories].items():
    got = theory.escape_time(q, 0.01, num_trajectories=num_trajectories)
    assert got == pytest.approx(expected, rel=1e-4), (num_trajectories, q)


@pytest.mark.parametrize("q", [0.0, 1e-3, 0.25, 0.5, 0.75, 0.999, 1.0])
@pytest.mark.parametrize("p0,delta", [(1e-2, 0.5), (1e-6, 0.5), (0.05, 0.9), (1e-4, 0.1)])
def test_escape_integral_matches_quadrature(q, p0, delta):
  assert theory.escape_integral(q, p0, delta=delta) == pytest.approx(_quad_integral(q, p0, delta), rel=1e-9)


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_series_agrees_with_closed_forms_at_the_endpoints(q):
  for p0 in (1e-1, 1e-3, 1e-6):
    closed = theory.escape_integral(q, p0, delta=0.5)
    assert escape._escape_integral_series(q, p0, 0.5) == pytest.approx(closed, rel=1e-12)


def test_escape_time_is_continuous_in_q_at_the_endpoints():
  for p0 in (1e-2, 1e-5):
    for q_end, q_near in ((0.0, 1e-9), (1.0, 1.0 - 1e-9)):
      assert theory.escape_integral(q_near, p0) == pytest.approx(theory.escape_integral(q_end, p0), rel=1e-6)


def test_prefactor_scales_with_the_number_of_correct_trajectories():
  base = theory.escape_integral(0.5, 1e-3)
  for k, c in ((2, 1), (10, 1), (10, 3), (7, 6)):
    assert theory.escape_time(0.5, 1e-3, num_trajectories=k, num_correct=c) == pytest.approx(base * c * (k - c) / k)
  assert theory.sigmoid_escape_time(0.5, 1e-3) == pytest.approx(base)


@pytest.mark.parametrize("q", Q_GRID)
def test_flow_matches_closed_form(q):
  for p0 in (1e-2, 1e-4, 1e-6):
    exact = theory.escape_time(q, p0, num_trajectories=10)
    simulated = theory.simulate_escape_time(q, p0, num_trajectories=10)
    assert simulated == pytest.approx(exact, rel=1e-3), (q, p0)


def test_flow_multi_correct_and_sigmoid_match_closed_forms():
  for q in (0.0, 0.5, 1.0):
    exact = theory.escape_time(q, 1e-3, num_trajectories=7, num_correct=3, delta=0.4)
    assert theory.simulate_escape_time(q, 1e-3, num_trajectories=7, num_correct=3, delta=0.4) == pytest.approx(
      exact, rel=1e-4)
    assert theory.simulate_sigmoid_escape_time(q, 1e-3) == pytest.approx(theory.sigmoid_escape_time(q, 1e-3),
                                                                          rel=1e-4)


def test_flow_leaves_global_precision_alone():
  theory.simulate_escape_time(0.5, 1e-2, num_trajectories=3)
  assert jnp.ones(1).dtype == jnp.float32
  assert not jax.config.jax_enable_x64


def test_toy_init_is_symmetric_and_hits_p0():
  theta_K = theory.softmax_toy_init(1e-3, num_trajectories=9, num_correct=2)
  np.testing.assert_array_equal(theta_K[2:], 0.0)
  assert theta_K[0] == theta_K[1]
  log_p = float(theory.softmax_toy_log_success(theta_K, num_correct=2))
  assert math.exp(log_p) == pytest.approx(1e-3, rel=1e-6)
  assert math.exp(float(theory.sigmoid_toy_log_success(theory.sigmoid_toy_init(0.3)))) == pytest.approx(0.3)


@pytest.mark.parametrize("q,expected_slope,tol", [(0.0, 1.0, 0.01), (0.25, 0.75, 0.01), (0.5, 0.5, 0.01),
                                                  (0.75, 0.25, 0.03)])
def test_log_log_slopes(q, expected_slope, tol):
  p0_P = np.array([1e-3, 1e-4, 1e-5, 1e-6])
  times = [theory.escape_time(q, p0, num_trajectories=10) for p0 in p0_P]
  assert theory.log_log_slope(1.0 / p0_P, times) == pytest.approx(expected_slope, abs=tol)


def test_log_law_at_q1():
  p0_P = np.array([1e-3, 1e-4, 1e-5, 1e-6])
  times = [theory.escape_time(1.0, p0, num_trajectories=10) for p0 in p0_P]
  slope = np.polyfit(np.log(1.0 / p0_P), times, 1)[0]
  assert slope == pytest.approx(0.9, abs=1e-3)  # (K-1)/K
  assert times[-1] / math.log(1e6) == pytest.approx(0.9, rel=0.1)


@pytest.mark.parametrize("q", [0.25, 0.5, 0.75])
def test_paper_remainder_bound(q):
  """Spec 1.5 App. C.1: 0 <= I_q - integral u^(q-2) du <= 8 delta^q / q."""
  for p0 in (1e-2, 1e-4, 1e-6):
    leading = (p0 ** (q - 1.0) - 0.5 ** (q - 1.0)) / (1.0 - q)
    remainder = theory.escape_integral(q, p0) - leading
    assert 0.0 <= remainder <= 8.0 * 0.5 ** q / q


@pytest.mark.parametrize("q", Q_GRID)
@pytest.mark.parametrize("num_trajectories", [None, 10])
def test_asymptotic_escape_time_is_the_leading_order_of_the_quadrature(q, num_trajectories):
  """Thm 5.2 / spec 2.7: T_q = s p0^-(1-q)/(1-q) (1 + o(1)), and s ln(1/p0) (1 + o(1)) at q = 1, with s = 1 for the
  sigmoid model and (K-1)/K for the softmax toy; checked against adaptive quadrature of eq. 15, not the formula.
  The gap T - asymptotic stays within the spec's O(1) terms (within O(log 1/p0) at q = 0), so the relative error
  falls as p0 -> 0."""
  delta = 0.5
  scale = 1.0 if num_trajectories is None else (num_trajectories - 1) / num_trajectories
  errors = []
  for p0 in (1e-2, 1e-4, 1e-6, 1e-8):
    exact = scale * _quad_integral(q, p0, delta)
    asymptotic = theory.escape_time_asymptotic(q, p0, num_trajectories=num_trajectories)
    gap = (exact - asymptotic) / scale
    if q == 0.0:  # I_0 - 1/p0 = -1/delta - 1/(1-p0) + 1/(1-delta) + 2 ln((1-p0) delta / (p0 (1-delta)))
      assert -1.0 / delta - 1.0 <= gap <= 2.0 * math.log(1.0 / p0) + 1.0
    elif q == 1.0:  # I_1 - ln(1/p0): ln(delta) from the lower terms, plus the remainder in [0, 8 (delta - p0)]
      assert math.log(delta) <= gap <= math.log(delta) + 8.0 * (delta - p0)
    else:  # I_q - p0^(q-1)/(1-q) = -delta^(q-1)/(1-q) + a remainder in [0, 8 delta^q / q]
      lower = -delta ** (q - 1.0) / (1.0 - q)
      assert lower <= gap <= lower + 8.0 * delta ** q / q
    errors.append(abs(exact / asymptotic - 1.0))
  assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
  assert errors[-1] < (0.2 if q == 1.0 else 0.05), errors


def test_ordering_and_growing_ratios():
  """Acceptance fact 7: T_0 > T_.25 > ... > T_1 at p0 << 1, and T_q/T_q' grows as p0 shrinks."""
  previous_ratios = None
  for p0 in (1e-2, 1e-4, 1e-6):
    times = [theory.escape_time(q, p0, num_trajectories=10) for q in Q_GRID]
    assert all(a > b for a, b in zip(times[:-1], times[1:])), (p0, times)
    ratios = np.array(times[:-1]) / np.array(times[1:])
    if previous_ratios is not None:
      assert np.all(ratios > previous_ratios)
    previous_ratios = ratios


def test_comparison_sandwich_thm_5_2():
  """Thms 5.1-5.2 on the sigmoid model: c^2 = (1-delta)^2 <= ||s||^2 <= 1 bounds T from both sides."""
  for q in Q_GRID:
    for p0 in (1e-2, 1e-5):
      lower = escape._power_difference(q - 1.0, p0, 0.5)  # integral of u^(q-2) from p0 to 1/2
      exact = theory.sigmoid_escape_time(q, p0)
      assert lower <= exact <= lower / 0.25


@pytest.mark.parametrize("kwargs,match", [
  (dict(q=0.5, p0=0.5), "p0 must lie in"),
  (dict(q=0.5, p0=0.7), "p0 must lie in"),
  (dict(q=0.5, p0=0.0), "p0 must lie in"),
  (dict(q=0.5, p0=-1e-3), "p0 must lie in"),
  (dict(q=0.5, p0=float("nan")), "finite"),
  (dict(q=1.5, p0=0.1), "q must lie in"),
  (dict(q=-0.1, p0=0.1), "q must lie in"),
  (dict(q=0.5, p0=0.1, num_correct=10), "C < K"),
  (dict(q=0.5, p0=0.1, num_correct=12), "C < K"),
  (dict(q=0.5, p0=0.1, num_correct=0), "num_correct must be >= 1"),
  (dict(q=0.5, p0=0.1, delta=1.0), "delta must lie in"),
  (dict(q=0.5, p0=0.1, num_trajectories=2.5), "num_trajectories must be an int"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
  kwargs = {"num_trajectories": 10, **kwargs}
  with pytest.raises(ValueError, match=match):
    theory.escape_time(**kwargs)
  with pytest.raises(ValueError, match=match):
    theory.simulate_escape_time(**kwargs)


def test_escape_time_entry_point_writes_table_plot_and_json(tmp_path, capsys):
  from experiments import escape_time as entry

  study = entry.main(["--out_dir", str(tmp_path), "--no_simulate"])
  assert (tmp_path / "escape_time.png").stat().st_size > 10_000
  assert json.loads((tmp_path / "escape_time.json").read_text())["slopes"] == study["slopes"]
  assert "Fitted slopes" in capsys.readouterr().out
  for q, slope in study["slopes"].items():
    assert slope["fitted"] == pytest.approx(slope["predicted"], abs=0.02), q
