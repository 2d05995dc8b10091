"""Rewards: answer extraction, exact / substring match, official HotPotQA / MuSiQue EM and F1, FinQA numeric match."""
import pytest

from tsallis_jax import rewards
from tsallis_jax.data.records import Record


def _rec(answer, aliases=(), dataset="hotpotqa"):
  return Record(id="r", question="q", answer=answer, aliases=tuple(aliases), dataset=dataset)


@pytest.mark.parametrize("completion, expected", [
    ("<think>a b</think>\n\nParis<|im_end|>", "Paris"),
    ("<think>x</think> Answer: 12.5%", "12.5%"),
    ("<think>x</think>The answer is **yes**.", "yes"),
    ("<think>x</think>\\boxed{42}", "42"),
    ("<think>1</think> wrong </think> \n right \n more", "right"),  # after the LAST </think>, first line
    ("<think> never closed, Paris", ""),
    ("<think>x</think>   <eos>", ""),
    ("<think>x</think> 5 5 8 <eos>", "5 5 8"),
    ("<think>x</think> \"The Kinks\"", "The Kinks"),
])
def test_extract_answer(completion, expected):
  assert rewards.extract_answer(completion) == expected


def test_exact_match_is_strict_but_case_and_space_insensitive():
  em = rewards.get_reward("exact_match")
  r = _rec("The Kinks", aliases=["Kinks"])
  assert em("<think>z</think> the  kinks.", r) == 1.0
  assert em("<think>z</think> Kinks", r) == 1.0  # alias
  assert em("<think>z</think> The Kinks band", r) == 0.0
  assert em("The Kinks", r) == 0.0  # no </think>: no answer
  assert em("<think>z</think>", _rec("")) == 0.0


def test_substring_match():
  sub = rewards.get_reward("substring_match")
  r = _rec("Thomas Vell", aliases=["T. Vell"])
  assert sub("<think>z</think> It was Thomas Vell, in 1880", r) == 1.0
  assert sub("<think>z</think> Vell", r) == 0.0  # the gold must be inside the answer, not the reverse
  assert sub("<think>Thomas Vell</think> nobody", r) == 0.0  # the rationale does not count
  assert sub("<think>z</think> t. vell", r) == 1.0


def test_official_normalization():
  assert rewards.normalize_answer("The  River, Ousel!") == "river ousel"
  assert rewards.normalize_answer("An apple a day") == "apple day"


def test_hotpot_em_f1_hand_computed():
  em, f1 = rewards.get_answer_scorer("hotpot_em"), rewards.get_answer_scorer("hotpot_f1")
  r = _rec("the River Ousel")
  assert em("River Ousel.", r) == 1.0
  # prediction tokens [ousel, flows, east], gold [river, ousel]: 1 common, P=1/3, R=1/2, F1=2*(1/6)/(5/6)=0.4
  assert f1("Ousel flows east", r) == pytest.approx(0.4)
  assert em("Ousel flows east", r) == 0.0
  yes = _rec("yes")
  assert f1("yes", yes) == 1.0
  assert f1("yes indeed", yes) == 0.0  # yes/no rule: normalised strings differ, one side is yes
  assert f1("no", _rec("no")) == 1.0
  assert f1("river yes", _rec("river")) == pytest.approx(2 / 3)  # the rule looks at whole strings only


def test_musique_max_over_aliases():
  f1, em = rewards.get_answer_scorer("musique_f1"), rewards.get_answer_scorer("musique_em")
  r = _rec("Thomas Vell", aliases=["Tom Vell"], dataset="musique")
  assert em("tom vell", r) == 1.0
  assert f1("Tom Vell", r) == 1.0  # exact on the alias
  # "vell family" vs "thomas vell": 1 common token, P = R = 1/2, F1 = 1/2 (the same against "tom vell")
  assert f1("Vell family", r) == pytest.approx(0.5)
  # "thomas vell jr" vs "thomas vell": P = 2/3, R = 1, F1 = 0.8; vs "tom vell": P = 1/3, R = 1/2, F1 = 0.4 -> max 0.8
  assert f1("Thomas Vell Jr", r) == pytest.approx(0.8)
  assert f1("yes", _rec("no", dataset="musique")) == 0.0


@pytest.mark.parametrize("prediction, gold, ok", [
    ("25%", "25%", True),
    ("25", "25%", True),             # percent sign omitted
    ("0.25", "25%", True),           # fraction for a percentage
    ("25.0 %", "25%", True),
    ("25.4%", "25%", True),          # rounds to the gold's precision (0 decimals)
    ("25.6%", "25%", False),
    ("33.33%", "33.3%", True),
    ("33.4%", "33.3%", False),
    ("$ 1,512.5 million", "1512.5", True),
    ("-40", "-40", True),
    ("40", "-40", False),
    ("yes", "yes", True),
    ("no", "yes", False),
    ("about", "12", False),
])
def test_numeric_match(prediction, gold, ok):
  assert rewards.numeric_match(prediction, gold) is ok


def test_finqa_numeric_uses_aliases():
  reward = rewards.get_reward("finqa_numeric")
  r = _rec("25%", aliases=["0.25"], dataset="finqa")
  assert reward("<think>z</think> 0.25", r) == 1.0
  assert reward("<think>z</think> 25 percent", r) == 1.0
  assert reward("<think>z</think> 2.5%", r) == 0.0


def test_registry():
  for name in ("exact_match", "substring_match", "finqa_numeric", "hotpot_em", "hotpot_f1", "musique_em",
               "musique_f1"):
    fn = rewards.get_reward(name)
    assert fn("<think>z</think> 7", _rec("7")) == 1.0
    assert fn("<think>z</think> 8", _rec("7")) == 0.0
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.get_reward("bleu")
