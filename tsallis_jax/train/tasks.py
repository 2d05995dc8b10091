"""The task a run trains on: tokenizer, train / validation / test records, and the special token ids.

`task` names the source; `task_options` ("k=v,k=v") its knobs:

* `synthetic` (`tsallis_jax.data.synthetic`): the target chain task with the p0 knob. Options: p0 (0.01), steps (4),
  modulus (10), train (2000), val (64), test (128), answer_lens ("": one task of nominal p0; "1/2/3": the
  mixed-difficulty `ChainMix` with buckets easy / medium / hard of 1, 2, 3 answer values, which overrides p0),
  shared_map (0; 1: every bucket uses one answer map). Splits are drawn from fixed data seeds (1, 2, 3), independent
  of the run's seed, so every run of the demo is evaluated on the same held-out prompts.
* `finqa`, `hotpotqa`, `musique`: the paper's datasets from `data_dir` (the official files; see tsallis_jax/data):
  the paper's subsets (`data.splits`). Options: reader (tfds: the TFDS builder of `data.builders` prepares the
  subsets once as array_record files under tfds_dir, default `$TSALLIS_JAX_CACHE/tfds`, and the records are read back
  through `as_data_source`; files: the official files are read directly; both give the same records in the same
  order), seed (0: the subset seed), train / val / test (0: the paper's sizes; n: n records of the subset draw;
  -1: all that remain, for small files).
* `file`: your own data (`tsallis_jax.data.files`). Options: train, val, test (a .jsonl / .json / .csv / .parquet
  path, relative to `data_dir` when that is set, or a `datasets` name such as `hf:org/name`, which needs the
  `datasets` library; a `@split` suffix picks its split), val_frac / test_frac (held-out fractions of the train
  source when there is no val / test source, drawn with split_seed, 0), dataset ("file": the record's dataset name,
  which picks the warm instructions and names the group in evaluation; "hotpotqa" gives HotPotQA's), hf_config.
  The column mapping is the config key `data_columns` (`question=q,answer=a,aliases=alts,context=ctx,split=part`); a
  split column assigns each row to train / val (validation, dev) / test.
* `fixture`: eight short factual questions (below), the same list for train, validation and test: a smoke test that
  the loop trains a real pretrained model (the SmolLM2 warm-start config), not a benchmark.

Every task is then built the same way (`make_task`): each source gives a tokenizer and `Record`s per split, and the
prompt keys apply to all of them alike: `prompt_style` (cold / warm), `prompt_template` (the warm prompt as a Python
format string, or `jinja:` + a Jinja template, over the record's fields; tsallis_jax/data/prompts.py) and
`chat_template` (auto / on / off).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from tsallis_jax.data.records import Record, RecordError
from tsallis_jax.errors import InputError
from tsallis_jax.train.config import ConfigError, TrainConfig, parse_options

SPLITS = ("train", "val", "test")
PAPER_DEFAULTS = {"reader": "tfds", "tfds_dir": "", "seed": 0, "train": 0, "val": 0, "test": 0}
FILE_DEFAULTS = {"train": "", "val": "", "test": "", "val_frac": 0.0, "test_frac": 0.0, "split_seed": 0,
                 "dataset": "file", "hf_config": ""}
FILE_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
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
  """What a run trains and evaluates on, built once by `build_task(cfg)`.

  `train`, `val`, `test` are the splits' `Record`s (tsallis_jax/data/records.py: question, gold answer and aliases,
  context passages, and the source file and index each error names); `tokenizer` renders their prompts
  (tsallis_jax/data/prompts.py); `info` records how the task was built (written to the run's results). `pad_id`,
  `stop_ids` and `close_tag_ids` are the special token ids the sampler needs.
  """
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
    """The tokens of `</think>` (one or several; `prompts.close_tag_ids`): what budget forcing feeds and the
    teacher-forced weight splices between the rationale and the gold answer."""
    from tsallis_jax.data import prompts
    try:
      return prompts.close_tag_ids(self.tokenizer)
    except ValueError as e:
      raise ConfigError(f"{e} Budget forcing and the teacher-forced weight need the closing tag.") from None


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


def _synthetic_splits(cfg: TrainConfig, tokenizer: Any):
  from tsallis_jax.data import synthetic
  mix, opts = synthetic_target(cfg)
  splits = {name: mix.records(opts[name], DATA_SEEDS[name]) for name in SPLITS}
  return (tokenizer or synthetic.make_tokenizer(), splits,
          {"task": "synthetic", "nominal_p0": mix.nominal_p0, "buckets": list(mix.buckets), **opts})


def _fixture_splits(cfg: TrainConfig, tokenizer: Any):
  if tokenizer is None:
    raise ConfigError("task='fixture' needs the model's tokenizer (model=hf or gguf)")
  # Context-free questions use HotPotQA's warm instructions (a short phrase as the answer).
  records = [Record(id=f"fixture-{i}", question=q, answer=a, dataset="hotpotqa", source="tasks.FIXTURE_QA", index=i)
             for i, (q, a) in enumerate(FIXTURE_QA)]
  return tokenizer, {name: records for name in SPLITS}, {"task": "fixture"}


def _tfds_config(cfg: TrainConfig, opts: dict[str, Any], sizes: dict[str, int] | None):
  """A builder config named by the subset seed, the sizes and the official files' size and mtime (a changed file is
  prepared again, never read stale)."""
  from tsallis_jax.data import builders, splits as splits_lib
  stat = [(f, os.stat(os.path.join(cfg.data_dir, f)).st_size, os.stat(os.path.join(cfg.data_dir, f)).st_mtime_ns)
          for f in splits_lib.required_files(cfg.task)]
  digest = hashlib.sha256(repr((os.path.abspath(cfg.data_dir), stat, sorted((sizes or {}).items()))).encode())
  return builders.SplitConfig(name=f"seed{opts['seed']}-{digest.hexdigest()[:12]}", seed=opts["seed"], sizes=sizes)


def _paper_splits(cfg: TrainConfig, tokenizer: Any):
  from tsallis_jax.data import splits as splits_lib
  opts = _options(cfg, PAPER_DEFAULTS)
  if not cfg.data_dir:
    raise ConfigError(f"task={cfg.task!r} needs data_dir, the folder of its official files. "
                      f"{splits_lib.MANUAL_DOWNLOAD_INSTRUCTIONS[cfg.task]}")
  if opts["reader"] not in ("tfds", "files"):
    raise ConfigError(f"task_options reader={opts['reader']!r}: use tfds (the TFDS builder) or files")
  sizes = {splits_lib.SPLIT_ALIASES.get(k, k): (opts[k] if opts[k] > 0 else None) for k in SPLITS if opts[k]}
  # The files first (a missing folder or a malformed record is the likelier mistake), then the tokenizer.
  if opts["reader"] == "tfds":
    from tsallis_jax.data import builders
    from tsallis_jax.model import gguf_io  # its cache_root: $TSALLIS_JAX_CACHE or ~/.cache/tsallis_jax
    splits_lib.check_files(cfg.task, cfg.data_dir)
    tfds_dir = os.path.expanduser(opts["tfds_dir"]) or os.path.join(gguf_io.cache_root(), "tfds")
    builder = builders.prepare(cfg.task, cfg.data_dir, tfds_dir, config=_tfds_config(cfg, opts, sizes or None))
    parts = {name: builders.load_split(builder, splits_lib.SPLIT_ALIASES.get(name, name)) for name in SPLITS}
  else:
    parts = {name: splits_lib.load_split(cfg.task, name, data_dir=cfg.data_dir, seed=opts["seed"],
                                         sizes=sizes or None) for name in SPLITS}
  if tokenizer is None:
    raise ConfigError(f"task={cfg.task!r} needs the model's tokenizer (model=hf with model_path)")
  return tokenizer, parts, {"task": cfg.task, **opts}


def _file_splits(cfg: TrainConfig, tokenizer: Any):
  from tsallis_jax.data import files
  opts = _options(cfg, FILE_DEFAULTS)
  if not opts["train"]:
    raise ConfigError("task='file' needs task_options train=PATH (a .jsonl / .json / .csv / .parquet file, or a"
                      " datasets name such as hf:org/name); val=PATH and test=PATH are optional")
  try:
    columns = files.parse_columns(cfg.data_columns)
  except InputError as e:
    raise ConfigError(str(e)) from None

  def where(source: str) -> str:
    if files.is_file_source(source) and cfg.data_dir and not os.path.isabs(os.path.expanduser(source)):
      return os.path.join(os.path.expanduser(cfg.data_dir), source)
    return os.path.expanduser(source) if files.is_file_source(source) else source

  def read(name: str):
    return files.read_records(where(opts[name]), columns, dataset=opts["dataset"], hf_config=opts["hf_config"],
                              split={"train": "train", "val": "validation", "test": "test"}[name])

  rows = read("train")
  named = {name: [r for r, _ in read(name)] for name in ("val", "test") if opts[name]}
  parts: dict[str, list[Record]] = {name: [] for name in SPLITS}
  if any(part is not None for _, part in rows):  # one file with a split column
    if named:
      raise ConfigError(f"{opts['train']} has a split column ({columns['split']!r}) and task_options also name"
                        f" {sorted(named)}; use one of the two")
    for record, part in rows:
      name = FILE_SPLIT_NAMES.get(part or "")
      if name is None:
        raise RecordError(f"{record.source}, record {record.index}: split {part!r} is not one of"
                          f" {sorted(FILE_SPLIT_NAMES)}")
      parts[name].append(record)
  else:
    parts["train"] = [r for r, _ in rows]
    parts.update(named)
    fracs = {name: opts[f"{name}_frac"] for name in ("val", "test") if opts[f"{name}_frac"] > 0}
    if fracs:
      if set(fracs) & set(named) or sum(fracs.values()) >= 1:
        raise ConfigError(f"task_options {fracs}: a held-out fraction is for a split with no file of its own, and"
                          " the fractions sum to < 1")
      order = np.random.default_rng(opts["split_seed"]).permutation(len(parts["train"]))
      pool, start = [parts["train"][i] for i in order], 0
      for name, frac in fracs.items():
        n = int(round(frac * len(pool)))
        parts[name], start = pool[start:start + n], start + n
      parts["train"] = sorted(pool[start:], key=lambda r: r.index)
  if not parts["train"]:
    raise ConfigError(f"task='file': no training records in {opts['train']}")
  if tokenizer is None:
    raise ConfigError("task='file' needs the model's tokenizer (model=hf or gguf with model_path)")
  return tokenizer, parts, {"task": "file", **{k: v for k, v in opts.items()}, "columns": columns}


SOURCES = {"synthetic": _synthetic_splits, "fixture": _fixture_splits, "finqa": _paper_splits,
           "hotpotqa": _paper_splits, "musique": _paper_splits, "file": _file_splits}


def make_task(cfg: TrainConfig, tokenizer: Any, splits: dict[str, list[Record]], info: dict[str, Any]) -> Task:
  """The one construction path of every task: the chat-template choice and the prompt template applied to all splits.

  `chat_template=off` removes the tokenizer's chat template (prompts are then `message <think>`; prompts.py);
  `on` requires one. `prompt_template` (warm prompts only) is stored in every record and rendered once here, so a
  field the records lack is a config error at start-up, not in the middle of a run.
  """
  has_chat = bool(getattr(tokenizer, "chat_template", None))
  if cfg.chat_template == "on" and not has_chat:
    raise ConfigError("chat_template=on but the tokenizer has no chat template; use auto or off, or a chat model")
  if cfg.chat_template == "off" and has_chat:
    tokenizer.chat_template = None
  if cfg.prompt_template:
    splits = {name: [dataclasses.replace(r, template=cfg.prompt_template) for r in records]
              for name, records in splits.items()}
    from tsallis_jax.data import prompts
    for records in splits.values():
      if records:
        try:
          prompts.user_message(records[0], "warm", "")
        except InputError as e:
          raise ConfigError(str(e)) from None
  return Task(tokenizer, splits["train"], splits["val"], splits["test"],
              {**info, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
               "prompt_template": cfg.prompt_template})


def build_task(cfg: TrainConfig, tokenizer: Any = None) -> Task:
  """Tokenizer and splits of `cfg.task` (a tokenizer passed in, e.g. the model's, takes precedence)."""
  if cfg.task not in SOURCES:
    raise ConfigError(f"task={cfg.task!r} is unknown; use synthetic, fixture, finqa, hotpotqa, musique or file")
  tok, splits, info = SOURCES[cfg.task](cfg, tokenizer)
  return make_task(cfg, tok, splits, info)
