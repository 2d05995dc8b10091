"""The task a run trains on: tokenizer, train / validation / test records, and the special token ids.

`task` names the source; `task_options` ("k=v,k=v") its knobs:

* `synthetic` (`tsallis_jax.data.synthetic`): the target chain task with the p0 knob. Options: p0 (0.01), steps (4),
  modulus (10), train (2000), val (64), test (128), answer_lens ("": one task of nominal p0; "1/2/3": the
  mixed-difficulty `ChainMix` with buckets easy / medium / hard of 1, 2, 3 answer values, which overrides p0),
  shared_map (0; 1: every bucket uses one answer map). Splits are drawn from fixed data seeds (1, 2, 3), independent
  of the run's seed, so every run of the demo is evaluated on the same held-out prompts.
* `finqa`, `hotpotqa`, `musique`: the paper's datasets from `data_dir` (the official files; see tsallis_jax/data):
  the paper's subsets (`data.splits.load_split`).
* `fixture`: eight short factual questions (below), the same list for train, validation and test: a smoke test that
  the loop trains a real pretrained model (the SmolLM2 warm-start config), not a benchmark.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tsallis_jax.data import splits as splits_lib
from tsallis_jax.data.records import Record
from tsallis_jax.train.config import ConfigError, TrainConfig, parse_options

SYNTHETIC_DEFAULTS = {"p0": 0.01, "steps": 4, "modulus": 10, "train": 2000, "val": 64, "test": 128,
                      "answer_lens": "", "shared_map": 0}
DATA_SEEDS = {"train": 1, "val": 2, "test": 3}
FIXTURE_QA = (
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("How many legs does a spider have?", "8"), ("What is 7 times 6?", "42"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What is the largest ocean on Earth?", "Pacific"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("How many days are in a week?", "7"),
)


@dataclasses.dataclass(frozen=True)
class Task:
  tokenizer: Any
  train: list[Record]
  val: list[Record]
  test: list[Record]
  info: dict[str, Any]

  @property
  def pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return int(self.tokenizer.eos_token_id if pad is None else pad)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (int(self.tokenizer.eos_token_id),)

  @property
  def close_tag_ids(self) -> tuple[int, ...]:
    tid = self.tokenizer.convert_tokens_to_ids("</think>")
    if tid is None or tid == self.tokenizer.unk_token_id:
      raise ConfigError("the tokenizer has no `</think>` token; budget forcing and the teacher-forced weight need it")
    return (int(tid),)


def _options(cfg: TrainConfig, defaults: dict[str, Any]) -> dict[str, Any]:
  given = parse_options(cfg.task_options)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ConfigError(f"task_options {unknown} are unknown for task={cfg.task!r}; valid: {sorted(defaults)}")
  return {k: type(defaults[k])(given.get(k, defaults[k])) for k in defaults}


def synthetic_target(cfg: TrainConfig):
  """The `ChainMix` of a synthetic config (the demo pretrains on its source tasks) and the parsed options."""
  from tsallis_jax.data import synthetic
  opts = _options(cfg, SYNTHETIC_DEFAULTS)
  try:
    if opts["answer_lens"]:
      lens = tuple(int(k) for k in opts["answer_lens"].split("/"))
      return synthetic.mixed_task(lens, modulus=opts["modulus"], num_steps=opts["steps"],
                                  shared_map=bool(opts["shared_map"])), opts
    return synthetic.ChainMix.single(synthetic.target_task(opts["p0"], num_steps=opts["steps"],
                                                           modulus=opts["modulus"])), opts
  except ValueError as e:  # int() of a bad length, or the task's own check
    raise ConfigError(f"task_options={cfg.task_options!r}: {e} (answer_lens is like 1/2/3)") from None


def build_task(cfg: TrainConfig, tokenizer: Any = None) -> Task:
  """Tokenizer and splits of `cfg.task` (a tokenizer passed in, e.g. the model's, takes precedence)."""
  if cfg.task == "synthetic":
    from tsallis_jax.data import synthetic
    mix, opts = synthetic_target(cfg)
    tok = tokenizer or synthetic.make_tokenizer()
    splits = {name: mix.records(opts[name], DATA_SEEDS[name]) for name in ("train", "val", "test")}
    return Task(tok, splits["train"], splits["val"], splits["test"],
                {"task": "synthetic", "nominal_p0": mix.nominal_p0, "buckets": list(mix.buckets), **opts})
  if cfg.task == "fixture":
    if tokenizer is None:
      raise ConfigError("task='fixture' needs the model's tokenizer (model=hf or gguf)")
    # Context-free questions use HotPotQA's warm instructions (a short phrase as the answer).
    records = [Record(id=f"fixture-{i}", question=q, answer=a, dataset="hotpotqa", source="tasks.FIXTURE_QA", index=i)
               for i, (q, a) in enumerate(FIXTURE_QA)]
    return Task(tokenizer, records, records, records, {"task": "fixture"})
  if cfg.task in ("finqa", "hotpotqa", "musique"):
    if not cfg.data_dir:
      raise ConfigError(f"task={cfg.task!r} needs data_dir, the folder of its official files. "
                        f"{splits_lib.MANUAL_DOWNLOAD_INSTRUCTIONS[cfg.task]}")
    # The files first (a missing folder or a malformed record is the likelier mistake), then the tokenizer.
    parts = {name: splits_lib.load_split(cfg.task, name, data_dir=cfg.data_dir) for name in ("train", "val", "test")}
    if tokenizer is None:
      raise ConfigError(f"task={cfg.task!r} needs the model's tokenizer (model=hf with model_path)")
    return Task(tokenizer, parts["train"], parts["val"], parts["test"], {"task": cfg.task})
  raise ConfigError(f"task={cfg.task!r} is unknown; use synthetic, fixture, finqa, hotpotqa or musique")
