"""The paper's train / validation / test subsets, drawn deterministically from a seed (issue 6; spec 1.7).

| dataset  | train (file)                        | validation + test (file)                          |
|----------|-------------------------------------|---------------------------------------------------|
| FinQA    | 6145 of `train.json` (6251)         | 872 of `dev.json`; 1132 of `test.json`            |
| HotPotQA | 9067 of `hotpot_train_v1.1.json`    | 342 + 343 of `hotpot_dev_distractor_v1.json`      |
| MuSiQue  | 9985 of `musique_ans_v1.0_train.jsonl` | 579 + 445 of `musique_ans_v1.0_dev.jsonl`      |

The paper gives the sizes, not how the subsets were drawn, and the official HotPotQA / MuSiQue test answers are
hidden; so validation and test of those two are disjoint subsets of the official dev file. The rule here: read a
file (records.py's reader; unanswerable MuSiQue records are dropped with a logged count), sort the records by id
(so the file's order does not matter), permute them with `numpy.random.default_rng([seed, crc32(file name)])`, and
take the first `n` (validation) and the next `n` (test). Same files and seed, same subsets, on any machine.
"""
from __future__ import annotations

import functools
import logging
import os
import zlib
from typing import Mapping

import numpy as np

from tsallis_jax.data import official
from tsallis_jax.data.records import Record
from tsallis_jax.errors import MissingFileError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
PAPER_SIZES: dict[str, dict[str, int]] = {
    "finqa": {"train": 6145, "validation": 872, "test": 1132},
    "hotpotqa": {"train": 9067, "validation": 342, "test": 343},
    "musique": {"train": 9985, "validation": 579, "test": 445},
}
SPLIT_FILES: dict[str, dict[str, str]] = {
    "finqa": {"train": "train.json", "validation": "dev.json", "test": "test.json"},
    "hotpotqa": {"train": "hotpot_train_v1.1.json", "validation": "hotpot_dev_distractor_v1.json",
                 "test": "hotpot_dev_distractor_v1.json"},
    "musique": {"train": "musique_ans_v1.0_train.jsonl", "validation": "musique_ans_v1.0_dev.jsonl",
                "test": "musique_ans_v1.0_dev.jsonl"},
}
MANUAL_DOWNLOAD_INSTRUCTIONS = {
    "finqa": ("Download `dataset/train.json`, `dataset/dev.json` and `dataset/test.json` from the FinQA repository "
              "(https://github.com/czyssrs/FinQA) and put the three files, unchanged, in the manual folder."),
    "hotpotqa": ("Download `hotpot_train_v1.1.json` and `hotpot_dev_distractor_v1.json` from https://hotpotqa.github.io "
                 "and put both files, unchanged, in the manual folder."),
    "musique": ("Download the MuSiQue data (https://github.com/StonyBrookNLP/musique, `download_data.sh`), unzip it, "
                "and put `musique_ans_v1.0_train.jsonl` and `musique_ans_v1.0_dev.jsonl`, unchanged, in the manual "
                "folder."),
}


def required_files(dataset: str) -> list[str]:
  if dataset not in SPLIT_FILES:
    raise ValueError(f"unknown dataset {dataset!r}; use one of {sorted(SPLIT_FILES)}.")
  return sorted(set(SPLIT_FILES[dataset].values()))


def check_files(dataset: str, folder: str) -> None:
  """Raises `MissingFileError` (a `FileNotFoundError`) listing the missing official files and how to get them."""
  missing = [f for f in required_files(dataset) if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise MissingFileError(f"{dataset}: missing {missing} in {folder!r}. {MANUAL_DOWNLOAD_INSTRUCTIONS[dataset]}")


def _permuted(records: list[Record], seed: int, file_name: str) -> list[Record]:
  records = sorted(records, key=lambda r: r.id)
  order = np.random.default_rng([seed, zlib.crc32(file_name.encode())]).permutation(len(records))
  return [records[i] for i in order]


def paper_splits(dataset: str, folder: str, *, seed: int = 0, sizes: Mapping[str, int | None] | None = None,
                 on_error: official.OnError = "raise") -> dict[str, list[Record]]:
  """{"train", "validation", "test"} -> records, by the rule of the module docstring.

  Args:
    dataset: "finqa", "hotpotqa" or "musique".
    folder: the folder holding the official files.
    seed: the subset seed.
    sizes: per-split sizes overriding `PAPER_SIZES` (None = every remaining record of the file).
    on_error: passed to the reader ("raise" or "skip" malformed records, with a logged count).
  """
  check_files(dataset, folder)
  want = dict(PAPER_SIZES[dataset])
  want.update(sizes or {})
  by_file: dict[str, list[Record]] = {}
  out: dict[str, list[Record]] = {}
  for split in SPLITS:
    file_name = SPLIT_FILES[dataset][split]
    if file_name not in by_file:
      records = official.read_official(dataset, os.path.join(folder, file_name), on_error=on_error)
      answerable = [r for r in records if r.answerable]
      if len(answerable) < len(records):
        log.info("%s: dropped %d unanswerable record(s) of %d", file_name, len(records) - len(answerable),
                 len(records))
      by_file[file_name] = _permuted(answerable, seed, file_name)
    pool = by_file[file_name]
    n = len(pool) if want[split] is None else want[split]
    if n > len(pool):
      raise ValueError(f"{dataset} {split}: {n} records requested but {file_name} has {len(pool)} left; the file is "
                       "not the full official release, or pass smaller `sizes`.")
    out[split], by_file[file_name] = pool[:n], pool[n:]
  return out


SPLIT_ALIASES = {"val": "validation", "dev": "validation"}


@functools.lru_cache(maxsize=8)
def _cached_splits(dataset: str, folder: str, seed: int, sizes: tuple) -> dict[str, tuple[Record, ...]]:
  return {k: tuple(v) for k, v in paper_splits(dataset, folder, seed=seed, sizes=dict(sizes) or None).items()}


def load_split(dataset: str, split: str, *, data_dir: str, seed: int = 0,
               sizes: Mapping[str, int | None] | None = None) -> list[Record]:
  """One subset of `paper_splits` (the paper's sizes unless `sizes`), the files read once per process.

  `split` is "train", "validation" (or "val" / "dev") or "test"; `data_dir` is the folder of the official files.
  """
  split = SPLIT_ALIASES.get(split, split)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; use one of {SPLITS} (or 'val').")
  folder = os.path.abspath(os.path.expanduser(data_dir))
  return list(_cached_splits(dataset, folder, seed, tuple(sorted((sizes or {}).items())))[split])
