"""Rewards selected by name: answer extraction, exact / substring match, the official QA metrics (issue 6; spec 1.7).

Every reward is a plain function `(completion_text, record) -> float` built from an answer scorer
`(answer, record) -> float` applied to `extract_answer(completion_text)` (`answer_segment` for strict_match);
`get_reward(name)` returns the former, `get_answer_scorer(name)` the latter, and `get_normalizer(name)` the
normalisation the metric compares under (maj@k votes on it, metrics.py).

Training and evaluation share this registry through one batched interface (TRL's `reward_funcs`):
`reward_func(completions, records, **columns) -> list[float]`, one float per completion, where `columns` are the
records' fields as lists (`answer`, `aliases`, `question`, ...) aligned with `completions`. `get_reward_func(spec)`
returns one for a registered name or for a user's function given by dotted path `my_pkg.rewards:fn`.

* `extract_answer`: the text after the *last* `</think>` (a completion without one has no answer, ""); end-of-turn
  markers removed; the first non-empty line; a leading `Answer:` / `Final answer:` / `The answer is` and a
  `\\boxed{...}` wrapper, surrounding quotes / `**` and a final period removed. This is the format the warm prompts
  ask for (prompts.py) and the one a cold-start model is trained into.
* `strict_match` (the paper's training reward, spec 1.7; the trainer's default `reward_funcs`): the whole answer
  segment as the sampler delimits it, the text after the *first* `</think>` with one final end-of-turn marker
  removed (`answer_segment`), equals the gold answer or an alias exactly, surrounding whitespace aside. No
  extraction, no case folding: on a word-level tokenizer (the synthetic task) it equals the token-id exact match
  the trainer computed before (answer tokens and stop token equal the gold's), while on a subword tokenizer it
  compares strings, so " Paris" and "Paris" tokenised differently still match.
* `exact_match`: the extracted answer equals the gold answer or an alias under `normalize_light` (case folded,
  whitespace collapsed, a final period removed).
* `substring_match` (the paper's evaluation): some gold string (answer or alias), light-normalised, is a substring
  of the light-normalised extracted answer; an empty answer scores 0.
* `hotpot_em`, `hotpot_f1`: HotPotQA's official normalisation (lower case, punctuation and the articles a/an/the
  removed, whitespace collapsed), EM and token F1, where F1 is 0 if either side is yes/no/noanswer and they differ.
  The max over the gold answer and aliases.
* `musique_em`, `musique_f1`: SQuAD normalisation (the same function), EM and F1 as the max over answer + aliases.
* `finqa_numeric`: see `numeric_match`: the first number of the answer, compared with every numeric gold form, in
  the gold's percent scale or the other one, with tolerance half a unit of the gold's last displayed decimal
  (so the prediction rounds to the gold) and at least 1e-4 relative; yes/no answers compare as words.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import re
import string
from typing import Any, Callable, Sequence

from tsallis_jax.data.records import Record
from tsallis_jax.errors import InputError

THINK_CLOSE = "</think>"
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<eos>", "</s>", "<pad>")
_PREFIX = re.compile(r"^\s*(?:final answer|answer|the (?:final )?answer is)\s*[:：]?\s*", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{(.*)\}")


def extract_answer(completion_text: str) -> str:
  """The answer written after the last `</think>` (see the module docstring); "" when there is none."""
  if THINK_CLOSE not in completion_text:
    return ""
  text = completion_text.rsplit(THINK_CLOSE, 1)[1]
  for marker in _END_MARKERS:
    text = text.split(marker, 1)[0]
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return ""
  answer = lines[0]
  boxed = _BOXED.search(answer)
  if boxed:
    answer = boxed.group(1)
  answer = _PREFIX.sub("", answer, count=1).strip()
  previous = None
  while answer != previous:  # peel `**`, quotes and a final period in any order
    previous = answer
    answer = answer.strip("*").strip()
    if len(answer) >= 2 and answer[0] == answer[-1] and answer[0] in "\"'`":
      answer = answer[1:-1].strip()
    if answer.endswith("."):
      answer = answer[:-1].rstrip()
  return answer


def answer_segment(completion_text: str) -> str:
  """The text after the first `</think>`, one final end-of-turn marker (not padding) removed, whitespace stripped;
  "" when there is no `</think>`. The sampler's answer segment as text (`strict_match`)."""
  if THINK_CLOSE not in completion_text:
    return ""
  text = completion_text.split(THINK_CLOSE, 1)[1].strip()
  for marker in _END_MARKERS:
    if marker != "<pad>" and text.endswith(marker):
      return text[:-len(marker)].strip()
  return text


def normalize_light(text: str) -> str:
  """Case folded, whitespace collapsed, a final period removed: the exact / substring match normalisation."""
  text = " ".join(text.casefold().split())
  return text[:-1].rstrip() if text.endswith(".") else text


def normalize_answer(text: str) -> str:
  """The official HotPotQA / SQuAD / MuSiQue normalisation: lower, no punctuation, no a/an/the, single spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _f1(prediction: str, gold: str, *, yes_no_rule: bool) -> float:
  pred_norm, gold_norm = normalize_answer(prediction), normalize_answer(gold)
  if yes_no_rule and (pred_norm in ("yes", "no", "noanswer") or gold_norm in ("yes", "no", "noanswer")) \
      and pred_norm != gold_norm:
    return 0.0
  pred_tokens, gold_tokens = pred_norm.split(), gold_norm.split()
  if not yes_no_rule and (not pred_tokens or not gold_tokens):  # SQuAD's rule for empty token lists
    return float(pred_tokens == gold_tokens)
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def exact_match_answer(answer: str, record: Record) -> float:
  return float(bool(answer) and any(normalize_light(answer) == normalize_light(g) for g in record.answers))


def strict_match_answer(answer: str, record: Record) -> float:
  return float(bool(answer) and answer in record.answers)


def substring_match_answer(answer: str, record: Record) -> float:
  pred = normalize_light(answer)
  return float(bool(pred) and any(normalize_light(g) in pred for g in record.answers if normalize_light(g)))


def official_em_answer(answer: str, record: Record) -> float:
  return float(any(normalize_answer(answer) == normalize_answer(g) for g in record.answers))


def hotpot_f1_answer(answer: str, record: Record) -> float:
  return max(_f1(answer, g, yes_no_rule=True) for g in record.answers)


def musique_f1_answer(answer: str, record: Record) -> float:
  return max(_f1(answer, g, yes_no_rule=False) for g in record.answers)


_NUMBER = re.compile(r"[-−]?\$?\s*\d[\d,]*(?:\.\d+)?|[-−]?\.\d+")


def _parse_numeric(text: str) -> tuple[float, bool, int] | None:
  """(value, has a percent sign, decimals shown) of the first number in `text`, or None."""
  m = _NUMBER.search(text)
  if not m:
    return None
  raw = m.group(0).replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
  try:
    value = float(raw)
  except ValueError:
    return None
  rest = text[m.end():].lstrip()
  percent = rest.startswith("%") or rest.lower().startswith("percent")
  decimals = len(raw.split(".")[1]) if "." in raw else 0
  return value, percent, decimals


def numeric_match(prediction: str, gold: str) -> bool:
  """FinQA's documented numeric match of one prediction against one gold string (module docstring)."""
  p_norm, g_norm = normalize_answer(prediction), normalize_answer(gold)
  if g_norm in ("yes", "no"):
    return p_norm == g_norm
  pred, ref = _parse_numeric(prediction), _parse_numeric(gold)
  if pred is None or ref is None:
    return False
  p, p_pct, _ = pred
  g, g_pct, g_dec = ref
  candidates = [p]
  if p_pct and not g_pct:
    candidates.append(p / 100.0)
  if g_pct and not p_pct:
    candidates.append(p * 100.0)
  tolerance = max(0.5 * 10.0 ** -g_dec, 1e-4 * abs(g)) + 1e-9
  return any(abs(c - g) <= tolerance for c in candidates)


def finqa_numeric_answer(answer: str, record: Record) -> float:
  return float(bool(answer) and any(numeric_match(answer, g) for g in record.answers))


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """A registered reward: its answer scorer, the normalisation its metric compares under (maj@k votes on it) and
  how the answer is taken from a completion."""
  score_answer: Callable[[str, Record], float]
  normalize: Callable[[str], str]
  extract: Callable[[str], str] = extract_answer


REWARDS: dict[str, RewardSpec] = {
    "strict_match": RewardSpec(strict_match_answer, str.strip, answer_segment),
    "exact_match": RewardSpec(exact_match_answer, normalize_light),
    "substring_match": RewardSpec(substring_match_answer, normalize_light),
    "finqa_numeric": RewardSpec(finqa_numeric_answer, normalize_light),
    "hotpot_em": RewardSpec(official_em_answer, normalize_answer),
    "hotpot_f1": RewardSpec(hotpot_f1_answer, normalize_answer),
    "musique_em": RewardSpec(official_em_answer, normalize_answer),
    "musique_f1": RewardSpec(musique_f1_answer, normalize_answer),
}


def _spec(name: str) -> RewardSpec:
  if name not in REWARDS:
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}.")
  return REWARDS[name]


def get_answer_scorer(name: str) -> Callable[[str, Record], float]:
  """The registered `(extracted answer, record) -> float`."""
  return _spec(name).score_answer


def get_normalizer(name: str) -> Callable[[str], str]:
  """The normalisation under which reward `name` compares answers (maj@k votes on it)."""
  return _spec(name).normalize


def get_extractor(name: str) -> Callable[[str], str]:
  """How reward `name` takes the answer from a completion (`extract_answer`, or `answer_segment` for strict_match)."""
  return _spec(name).extract


def get_reward(name: str) -> Callable[[str, Record], float]:
  """The registered reward `(completion_text, record) -> float` (module docstring)."""
  spec = _spec(name)

  def reward(completion_text: str, record: Record) -> float:
    return spec.score_answer(spec.extract(completion_text), record)

  reward.__name__ = name
  reward.__doc__ = f"`{name}` of the answer extracted from a completion (tsallis_jax.rewards)."
  return reward


# ------------------------------------------------------------------------------------------------ batched interface

RewardFunc = Callable[..., Sequence[float]]
"""`(completions: list[str], records: list[Record], **columns) -> list[float]`, one reward per completion."""


class RewardFuncError(InputError):
  """A reward function that cannot be found, or that returned something other than one finite float per completion."""


def record_columns(records: Sequence[Record]) -> dict[str, list[Any]]:
  """The records' fields as columns (`answer`, `aliases`, `question`, ...), aligned with `records`."""
  return {f.name: [getattr(r, f.name) for r in records] for f in dataclasses.fields(Record)}


def get_reward_func(spec: str | RewardFunc) -> RewardFunc:
  """The batched reward function of a registered name, of a dotted path `module:function`, or `spec` itself if it
  is already callable. Raises `RewardFuncError` naming what could not be found."""
  if callable(spec):
    return spec
  spec = spec.strip()
  if spec in REWARDS:
    reward = get_reward(spec)

    def batched(completions: Sequence[str], records: Sequence[Record], **columns) -> list[float]:
      del columns
      return [reward(c, r) for c, r in zip(completions, records)]

    batched.__name__ = spec
    return batched
  if ":" not in spec:
    raise RewardFuncError(f"reward function {spec!r} is neither registered ({sorted(REWARDS)}) nor a dotted path"
                          " `module:function` (e.g. my_pkg.rewards:my_reward)")
  module_name, _, attr = spec.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise RewardFuncError(f"reward function {spec!r}: cannot import module {module_name!r} ({e}); put it on"
                          " PYTHONPATH or install it") from None
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
  if not callable(fn):
    raise RewardFuncError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}")
  return fn


def _func_name(fn: RewardFunc) -> str:
  return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _raises(fn: RewardFunc, completions: Sequence[str], records: Sequence[Record]) -> bool:
  try:
    fn(list(completions), list(records), **record_columns(records))
  except Exception:  # noqa: BLE001 (locating the row a user's function fails on)
    return True
  return False


def call_reward_func(fn: RewardFunc, completions: Sequence[str], records: Sequence[Record]) -> list[float]:
  """`fn(completions, records, **record_columns(records))`, checked: one finite float per completion, else a
  `RewardFuncError` naming the function and the first bad row (its record's file, index and id). A function that
  raises is called again row by row to name the first row it fails on."""
  try:
    out = fn(list(completions), list(records), **record_columns(records))
  except Exception as e:  # the user's code: name the function and the first row it fails on, in one line
    row = next((i for i in range(len(records)) if _raises(fn, completions[i:i + 1], records[i:i + 1])), None)
    where = ("" if row is None else
             f" on completion {row} ({records[row].where()}, completion text {completions[row][:80]!r})")
    raise RewardFuncError(f"reward function {_func_name(fn)} raised {type(e).__name__}: {e}{where}") from e
  try:
    values = [float(v) for v in out]
  except (TypeError, ValueError) as e:
    raise RewardFuncError(f"reward function {_func_name(fn)} returned {type(out).__name__} ({e}); it must return one"
                          f" float per completion ({len(completions)})") from None
  if len(values) != len(completions):
    raise RewardFuncError(f"reward function {_func_name(fn)} returned {len(values)} values for {len(completions)}"
                          " completions; return one float per completion, in order")
  for i, v in enumerate(values):
    if not (v == v and abs(v) != float("inf")):
      raise RewardFuncError(f"reward function {_func_name(fn)} returned {v} for completion {i} ({records[i].where()},"
                            f" completion text {completions[i][:80]!r}); rewards must be finite floats")
  return values
