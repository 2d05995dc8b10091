"""p@1, unbiased pass@k and maj@k on hand-computed cases, and the eval/* helper."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tsallis_jax import metrics, rewards
from tsallis_jax.data.records import Record


def test_p_at_1():
  assert metrics.p_at_1(np.array([[1, 0, 0, 1], [0, 0, 0, 0]])) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    metrics.p_at_1(np.array([1, 0]))


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 0.25),            # 1 - C(3,1)/C(4,1) = 1 - 3/4
    (4, 1, 2, 0.5),             # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),             # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (16, 0, 16, 0.0),
    (16, 1, 16, 1.0),
    (3, 3, 1, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
  assert metrics.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomials_and_is_stable():
  for n, c, k in [(20, 3, 5), (32, 7, 16), (100, 1, 10)]:
    assert metrics.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
  big = metrics.pass_at_k(5000, 2, 16)
  assert big == pytest.approx(1 - math.comb(4998, 16) / math.comb(5000, 16), rel=1e-9) and 0 < big < 1
  with pytest.raises(ValueError, match="at least k"):
    metrics.pass_at_k(4, 1, 5)


def test_maj_at_k_votes_on_normalized_answers():
  gold = lambda a: rewards.normalize_light(a) == "paris"  # noqa: E731
  assert metrics.maj_at_k(["Paris", "London", "paris.", "Rome"], gold, 4) == 1.0   # 2 votes vs 1, 1
  assert metrics.maj_at_k(["London", "Paris", "london", "Paris", "LONDON"], gold, 5) == 0.0
  assert metrics.maj_at_k(["London", "Paris", "london", "Paris", "paris"], gold, 4) == 0.0  # first 4 only: tie
  assert metrics.maj_at_k(["", "", "Paris"], gold, 3) == 1.0  # empty answers do not vote
  assert metrics.maj_at_k(["", ""], gold, 2) == 0.0


def test_maj_tie_break_is_first_occurrence():
  assert metrics.majority_vote(["b", "a", "a", "b"], str) == "b"
  assert metrics.majority_vote(["a", "b", "b", "a"], str) == "a"
  assert metrics.majority_vote(["c", "a", "b"], str) == "c"
  gold_a = lambda x: x == "a"  # noqa: E731
  assert metrics.maj_at_k(["b", "a", "a", "b"], gold_a, 4) == 0.0
  assert metrics.maj_at_k(["a", "b", "b", "a"], gold_a, 4) == 1.0


def test_eval_metrics_hand_computed():
  recs = [Record(id="1", question="q", answer="Paris"), Record(id="2", question="q", answer="42")]
  c = lambda a: f"<think>z</think> {a}"  # noqa: E731
  completions = [[c("Paris, France"), c("London"), c("London"), c("Paris")],
                 [c("41"), c("7"), c("7"), "<think> no answer"]]
  out = metrics.eval_metrics(completions, recs, reward_name="substring_match", k=2)
  # p@1 = (2 + 0) / 8; pass@2: problem 1 has c=2 of n=4: 1 - C(2,2)/C(4,2) = 5/6, problem 2: 0.
  # maj@2 over the first two answers: ("paris, france", "london") tie -> "Paris, France", correct; ("41", "7") -> 41.
  assert out == pytest.approx({"eval/p@1": 0.25, "eval/pass@2": 5 / 12, "eval/maj@2": 0.5})
  with pytest.raises(ValueError, match="fewer than k"):
    metrics.eval_metrics(completions, recs, k=16)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "A", "b", "c", ""]), min_size=1, max_size=12))
def test_majority_vote_property(answers):
  voted = metrics.majority_vote(answers, str.lower)
  keys = [a.lower() for a in answers if a]
  if not keys:
    assert voted is None
    return
  top = max(keys.count(k) for k in keys)
  assert keys.count(voted.lower()) == top  # a most frequent key
  earliest = next(a for a in answers if a and keys.count(a.lower()) == top)
  assert voted == earliest  # the first answer whose key has the top count


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_monotone(nck):
  n, c, k = nck
  value = metrics.pass_at_k(n, c, k)
  assert 0.0 <= value <= 1.0
  if k < n:
    assert metrics.pass_at_k(n, c, k + 1) >= value - 1e-12
  if c < n:
    assert metrics.pass_at_k(n, c + 1, k) >= value - 1e-12
  assert metrics.pass_at_k(n, c, 1) == pytest.approx(c / n)
