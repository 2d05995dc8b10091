"""Synthetic multi-step modular-arithmetic tasks for CPU-scale cold-start experiments (issue 6).

The paper's cold-start regime (spec 1.5, 1.7) is a target task whose initial success probability p0 = P_theta is
tiny. These tasks reproduce it with a model of a few hundred thousand parameters:

* **The chain.** A question is a start value and `num_steps` operations modulo `modulus`, for example
  `target start 7 add 3 mul 2 sub 5`. The gold rationale writes every partial result,
  `add 3 = 0 mul 2 = 0 sub 5 = 5`, one operation per step. A tiny model cannot compute the last partial result of a
  long chain in one forward pass, but it can compute one step at a time: the rationale really helps.
* **The answer** is the last `answer_len` partial results, each mapped by the task's answer map
  `v -> (a * v + c) mod modulus` (`a` coprime with `modulus`, so the map is a permutation of the result space).
  The *source* task uses the identity map (1, 0); a *target* task uses a map the model never sees with correct
  answers.
* **Pretraining** (`pretraining_records`) mixes source-task records (correct rationales and answers: they teach the
  format and the arithmetic) with target-task records whose rationales are correct but whose answers are drawn
  uniformly at random from the `modulus ** answer_len` possible answers. The pretrained model thus learns the
  target's format, computes its rationale, and places (at best) uniform mass on the answers.

**The p0 knob.** Under such a model the success probability of the target task is about
`P(rationale correct) * modulus ** -answer_len` (`ChainTask.nominal_p0`), because the answer map is not learnable from
the pretraining data. `target_task(p0)` picks `answer_len` and `modulus` to hit 1e-1 ... 1e-4 (for example
modulus 10 with 1 to 4 answer values). This is a *nominal* value: a model that has not fitted the uniform answers, or
computes the rationale wrongly, has a different p0, and whoever pretrains must measure the actual p0 (the trainer's
demo does). With `target_fraction=0` in pretraining the model has never seen the target marker and p0 is not
controlled at all.

**Heterogeneous difficulty (`ChainMix`, the demo's task since issue 14).** Real data (FinQA, HotPotQA) has per-prompt
cold-start P spread over orders of magnitude, and that spread is the only thing q can act on under AdamW (a scale
shared by every example is removed by the optimizer; spec 1.4: q reweights prompts by P^-q). `mixed_task((1, 2, 3, 4))`
(the demo's) draws prompts from difficulty buckets `easy` / `medium` / `hard` / `hardest` whose answers have 1 to 4
values, so the nominal p0 is 1e-1 ... 1e-4 (modulus 10): three orders of magnitude. Each bucket has its own question
marker (`task4` ... `task7`) and its own answer map (`MIX_MAPS`), which the pretrained model never saw with correct
answers. Distinct maps are the default
so that a bucket can only be learned from its own prompts: the hard prompts then escape by the weight the update
gives *them*, which is what q changes (with `shared_map=True` every bucket uses the first map and the easy prompts
teach the hard ones: an ablation). Pretraining uses one identity-map source task per bucket (markers `task0`...). Each
record's `dataset` is `synthetic/<bucket>`, so evaluation can be split by bucket. A single-task `ChainMix.single(t)`
is the old one-map task (bucket `target`).

Records use the common `Record` (question, answer, rationale; empty context). `make_tokenizer()` builds the
word-level tokenizer for every task of this family (special tokens `<pad>`, `<eos>`, `<think>`, `</think>`,
`<unk>`), as a `transformers` fast tokenizer that `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from tsallis_jax.data.records import Record

MAX_MODULUS = 64
OPS = ("add", "sub", "mul")
TASK_NAMES = ("source", "target") + tuple(f"task{i}" for i in range(8))
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<think>", "</think>")
# Words of the warm-start instructions (prompts.py) and of the chain itself.
INSTRUCTION_WORDS = ("chain", "modulo", ":", "write", "each", "step", ",", "then", "answer", "with", "values", ".",
                     "question", "start", "=")


@dataclasses.dataclass(frozen=True)
class ChainTask:
  """One task of the family: chains of `num_steps` operations modulo `modulus`, answered by `answer_len` values.

  Attributes:
    name: the task marker, the first word of every question (one of `TASK_NAMES`).
    modulus: m, the size of the value space; values are the words `0` ... `m-1`.
    num_steps: L, the number of operations (the rationale has 4 L words).
    answer_len: k, the number of answer words: the last k partial results under the answer map.
    answer_map: (a, c) for v -> (a v + c) mod m; (1, 0) is the identity (the source task).
    ops: the operations drawn for each step.
  """
  name: str = "source"
  modulus: int = 10
  num_steps: int = 4
  answer_len: int = 1
  answer_map: tuple[int, int] = (1, 0)
  ops: tuple[str, ...] = OPS

  def __post_init__(self):
    if self.name not in TASK_NAMES:
      raise ValueError(f"ChainTask name {self.name!r} is not in the tokenizer's vocabulary; use one of {TASK_NAMES}.")
    if not 2 <= self.modulus <= MAX_MODULUS:
      raise ValueError(f"modulus={self.modulus} must be in [2, {MAX_MODULUS}] (one vocabulary word per value).")
    if self.num_steps < 1 or not 1 <= self.answer_len <= self.num_steps:
      raise ValueError(f"need num_steps >= 1 and 1 <= answer_len <= num_steps, got num_steps={self.num_steps}, "
                       f"answer_len={self.answer_len}.")
    a, _ = self.answer_map
    if math.gcd(a % self.modulus, self.modulus) != 1:
      raise ValueError(f"answer_map multiplier {a} is not coprime with modulus {self.modulus}, so the map is not a "
                       "permutation of the result space; pick a multiplier coprime with the modulus.")
    if not self.ops or any(op not in OPS for op in self.ops):
      raise ValueError(f"ops={self.ops!r} must be a non-empty subset of {OPS}.")

  @property
  def answer_space_size(self) -> int:
    return self.modulus ** self.answer_len

  @property
  def nominal_p0(self) -> float:
    """`modulus ** -answer_len`: p0 of a model that computes the rationale right and answers uniformly at random."""
    return 1.0 / self.answer_space_size

  def map_value(self, v: int) -> int:
    a, c = self.answer_map
    return (a * v + c) % self.modulus


def target_task(p0: float = 1e-2, *, name: str = "target", num_steps: int = 4, modulus: int = 10,
                answer_map: tuple[int, int] = (3, 7)) -> ChainTask:
  """A target task whose nominal p0 = modulus ** -answer_len is the closest to `p0` (see the module docstring).

  With modulus 10 the answer has log10(1/p0) values: 1e-1 ... 1e-3 in 1 to 3 answer words, 1e-4 in 4. To reach about
  1e-4 with 3 answer words use `modulus=22` (nominal p0 = 22**-3 = 9.4e-5).
  """
  if not 0.0 < p0 < 1.0:
    raise ValueError(f"p0={p0} must be in (0, 1).")
  answer_len = max(1, round(math.log(1.0 / p0) / math.log(modulus)))
  return ChainTask(name=name, modulus=modulus, num_steps=max(num_steps, answer_len), answer_len=answer_len,
                   answer_map=answer_map)


def source_task(target: ChainTask, *, name: str = "source") -> ChainTask:
  """The pretraining task matching `target`: same chains and answer length, identity answer map."""
  return dataclasses.replace(target, name=name, answer_map=(1, 0))


def _apply(op: str, v: int, x: int, m: int) -> int:
  if op == "add":
    return (v + x) % m
  if op == "sub":
    return (v - x) % m
  return (v * x) % m


def solve(task: ChainTask, start: int, steps: tuple[tuple[str, int], ...]) -> tuple[list[int], str]:
  """The partial results of a chain and its gold answer string."""
  partials, v = [], start
  for op, x in steps:
    v = _apply(op, v, x, task.modulus)
    partials.append(v)
  answer = " ".join(str(task.map_value(p)) for p in partials[-task.answer_len:])
  return partials, answer


def make_records(task: ChainTask, num_records: int, seed: int, *, random_answers: bool = False,
                 id_prefix: str | None = None) -> list[Record]:
  """`num_records` chains of `task`, drawn deterministically from `seed`.

  With `random_answers`, each answer is drawn uniformly from the task's answer space instead of the gold map (the
  uninformative target-task records of the pretraining mix); the rationale stays correct.
  """
  if num_records < 0:
    raise ValueError(f"num_records={num_records} must be >= 0.")
  rng = np.random.default_rng(seed)
  prefix = id_prefix or f"{task.name}-m{task.modulus}-L{task.num_steps}-k{task.answer_len}-s{seed}"
  records = []
  for i in range(num_records):
    start = int(rng.integers(task.modulus))
    steps = tuple((task.ops[int(rng.integers(len(task.ops)))], int(rng.integers(task.modulus)))
                  for _ in range(task.num_steps))
    partials, answer = solve(task, start, steps)
    if random_answers:
      answer = " ".join(str(int(v)) for v in rng.integers(task.modulus, size=task.answer_len))
    question = " ".join([task.name, "start", str(start)] + [f"{op} {x}" for op, x in steps])
    rationale = " ".join(f"{op} {x} = {p}" for (op, x), p in zip(steps, partials))
    records.append(Record(id=f"{prefix}-{i}", question=question, answer=answer, rationale=rationale,
                          dataset="synthetic/" + task.name, source=f"synthetic:{prefix}", index=i))
  return records


def pretraining_records(source: ChainTask, target: ChainTask | None, num_records: int, seed: int, *,
                        target_fraction: float = 0.5) -> list[Record]:
  """The pretraining mix: source records plus `target_fraction` target records with random answers, shuffled."""
  if not 0.0 <= target_fraction <= 1.0:
    raise ValueError(f"target_fraction={target_fraction} must be in [0, 1].")
  if target is not None and (target.modulus, target.answer_len) != (source.modulus, source.answer_len):
    raise ValueError("source and target tasks must share modulus and answer_len (use source_task(target)).")
  num_target = 0 if target is None else int(round(target_fraction * num_records))
  records = make_records(source, num_records - num_target, seed)
  if num_target:
    records += make_records(target, num_target, seed + 1, random_answers=True,
                            id_prefix=f"{target.name}-pretrain-random-s{seed}")
  order = np.random.default_rng(seed + 2).permutation(len(records))
  return [records[i] for i in order]


MIX_BUCKETS = {3: ("easy", "medium", "hard"), 4: ("easy", "medium", "hard", "hardest")}
# Answer maps of the buckets: distinct, none the identity of the source tasks, multipliers coprime with 10 (a modulus
# that shares a factor with one is refused by ChainTask).
MIX_MAPS = ((3, 7), (7, 1), (9, 4), (3, 2))


@dataclasses.dataclass(frozen=True)
class ChainMix:
  """Target tasks of several difficulties drawn in equal shares (see the module docstring).

  Attributes:
    targets: one `ChainTask` per bucket (its `name` is the question marker).
    buckets: the bucket names, in the order of `targets` (the `Record.dataset` suffix).
    sources: the pretraining task of each bucket (identity map, its own marker).
  """
  targets: tuple[ChainTask, ...]
  buckets: tuple[str, ...]
  sources: tuple[ChainTask, ...]

  def __post_init__(self):
    if not self.targets or len(self.buckets) != len(self.targets) or len(self.sources) != len(self.targets):
      raise ValueError("a ChainMix needs one bucket name and one source task per target task.")
    names = [t.name for t in self.targets + self.sources]
    if len(set(names)) != len(names):
      raise ValueError(f"question markers must differ across targets and sources, got {names}.")

  @classmethod
  def single(cls, target: ChainTask) -> "ChainMix":
    """The one-task form (bucket `target`, source marker `source`)."""
    return cls((target,), ("target",), (source_task(target),))

  @property
  def nominal_p0(self) -> dict[str, float]:
    return {b: t.nominal_p0 for b, t in zip(self.buckets, self.targets)}

  def records(self, num_records: int, seed: int) -> list[Record]:
    """`num_records` prompts, as equal as possible per bucket, shuffled; `dataset` is `synthetic/<bucket>`."""
    if len(self.targets) == 1:
      return make_records(self.targets[0], num_records, seed)
    shares = [num_records // len(self.targets) + (i < num_records % len(self.targets))
              for i in range(len(self.targets))]
    records = []
    for i, (bucket, target, n) in enumerate(zip(self.buckets, self.targets, shares)):
      records += [dataclasses.replace(r, dataset=f"synthetic/{bucket}")
                  for r in make_records(target, n, seed * 100 + i, id_prefix=f"{bucket}-{target.name}-s{seed}")]
    order = np.random.default_rng(seed + 7).permutation(len(records))
    return [dataclasses.replace(records[j], index=i) for i, j in enumerate(order)]

  def pretraining_records(self, num_records: int, seed: int, *, target_fraction: float = 0.5) -> list[Record]:
    """Each bucket's `pretraining_records` (source with correct answers, target with random ones), shuffled."""
    records = []
    for i, (source, target) in enumerate(zip(self.sources, self.targets)):
      n = num_records // len(self.targets) + (i < num_records % len(self.targets))
      records += pretraining_records(source, target, n, seed + 1000 * i, target_fraction=target_fraction)
    order = np.random.default_rng(seed + 3).permutation(len(records))
    return [records[j] for j in order]


def mixed_task(answer_lens: tuple[int, ...] = (1, 2, 3), *, modulus: int = 10, num_steps: int = 4,
               shared_map: bool = False) -> ChainMix:
  """Buckets of `answer_lens` answer values (nominal p0 = modulus ** -k each); see the module docstring."""
  if not 1 <= len(answer_lens) <= len(MIX_MAPS):
    raise ValueError(f"answer_lens={answer_lens}: give 1 to {len(MIX_MAPS)} answer lengths, e.g. (1, 2, 3).")
  if any(k > num_steps for k in answer_lens):
    raise ValueError(f"answer_lens={answer_lens} must each be <= steps={num_steps} (an answer is the last k partial"
                     " results); raise steps or shorten the answers.")
  buckets = MIX_BUCKETS.get(len(answer_lens), tuple(f"k{k}" for k in answer_lens))
  targets = tuple(ChainTask(name=f"task{4 + i}", modulus=modulus, num_steps=num_steps, answer_len=k,
                            answer_map=MIX_MAPS[0 if shared_map else i]) for i, k in enumerate(answer_lens))
  sources = tuple(source_task(t, name=f"task{i}") for i, t in enumerate(targets))
  return ChainMix(targets, buckets, sources)


def vocabulary() -> list[str]:
  """Every word of the family, specials first (ids 0..4), in a fixed order."""
  words = list(SPECIAL_TOKENS) + [str(v) for v in range(MAX_MODULUS)] + list(OPS) + list(TASK_NAMES)
  words += [w for w in INSTRUCTION_WORDS if w not in words]
  return words


def make_tokenizer():
  """A word-level `transformers` fast tokenizer over `vocabulary()` (whitespace split, `<eos>` as EOS).

  `tokenizer.save_pretrained(folder)` writes an HF tokenizer folder; `AutoTokenizer.from_pretrained(folder)` loads it.
  """
  import tokenizers
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(vocabulary())}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                 additional_special_tokens=["<think>", "</think>"])
