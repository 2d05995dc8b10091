"""TFDS builders for FinQA, HotPotQA and MuSiQue over a manual-download folder (issue 6).

The TFDS convention for data that must be downloaded by hand: each builder has `MANUAL_DOWNLOAD_INSTRUCTIONS`,
reads the unchanged official files from `download_config.manual_dir` (`splits.check_files` raises with the
instructions when one is missing) and prepares the paper's subsets (splits.py) as `array_record` files. Reading back
goes through `builder.as_data_source(split=...)`, which needs no TensorFlow (checked here with no TensorFlow
installed; `tfds.core.DatasetInfo(builder=self, features=...)` builds the info, ECOSYSTEM.md).

Features: `id`, `question`, `answer` (text), `record` (the whole `Record` as JSON, `Record.from_json` reads it
back) and `position` (the record's place in the subset); `load_split` returns the `Record`s in subset order. The builder config carries the subset seed and, for tests, smaller sizes:
`FinqaTsallis(config=SplitConfig(name="seed1", seed=1), data_dir=..., ...)`.

    builder = FinqaTsallis(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="~/finqa_files"))
    train = load_split(builder, "train")
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tsallis_jax.data import splits as splits_lib
from tsallis_jax.data.records import Record


@dataclasses.dataclass(eq=False)
class SplitConfig(tfds.core.BuilderConfig):
  """The subset seed and optional per-split sizes (None keeps the paper's sizes, splits.PAPER_SIZES)."""
  seed: int = 0
  sizes: dict[str, int | None] | None = None


class _PaperSplitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body: subclasses set DATASET (a key of splits.SPLIT_FILES)."""
  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The paper's subsets (spec 1.7) of the official files."}
  BUILDER_CONFIGS = [SplitConfig(name="paper_seed0", description="Paper sizes, subset seed 0.")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS locates a builder's source file to look for a checksums file, and for a builder inside an installed
    # package that lookup imports `importlib_resources`, which is not a dependency here. These builders download
    # nothing, so they have no checksums file: skip the lookup.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET}: the paper's subsets of the official files (tsallis_jax.data.splits).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "question": tfds.features.Text(), "answer": tfds.features.Text(),
            "record": tfds.features.Text(), "position": tfds.features.Scalar(np.int64)}),
        supervised_keys=None)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    folder = str(dl_manager.manual_dir)
    splits_lib.check_files(self.DATASET, folder)
    records = splits_lib.paper_splits(self.DATASET, folder, seed=self.builder_config.seed,
                                      sizes=self.builder_config.sizes)
    return {split: self._generate_examples(records[split]) for split in splits_lib.SPLITS}

  def _generate_examples(self, records: list[Record]):
    for position, record in enumerate(records):
      yield record.id, {"id": record.id, "question": record.question, "answer": record.answer,
                        "record": record.to_json(), "position": position}


class FinqaTsallis(_PaperSplitsBuilder):
  """FinQA (Chen et al. 2021): `train.json`, `dev.json`, `test.json`."""
  DATASET = "finqa"
  MANUAL_DOWNLOAD_INSTRUCTIONS = splits_lib.MANUAL_DOWNLOAD_INSTRUCTIONS["finqa"]


class HotpotqaTsallis(_PaperSplitsBuilder):
  """HotPotQA distractor (Yang et al. 2018): `hotpot_train_v1.1.json`, `hotpot_dev_distractor_v1.json`."""
  DATASET = "hotpotqa"
  MANUAL_DOWNLOAD_INSTRUCTIONS = splits_lib.MANUAL_DOWNLOAD_INSTRUCTIONS["hotpotqa"]


class MusiqueTsallis(_PaperSplitsBuilder):
  """MuSiQue-Ans (Trivedi et al. 2022): `musique_ans_v1.0_{train,dev}.jsonl`."""
  DATASET = "musique"
  MANUAL_DOWNLOAD_INSTRUCTIONS = splits_lib.MANUAL_DOWNLOAD_INSTRUCTIONS["musique"]


BUILDERS = {"finqa": FinqaTsallis, "hotpotqa": HotpotqaTsallis, "musique": MusiqueTsallis}


def prepare(dataset: str, manual_dir: str, data_dir: str, *, config: SplitConfig | None = None
            ) -> tfds.core.GeneratorBasedBuilder:
  """Builds (once) and returns the builder of `dataset` with `array_record` files under `data_dir`."""
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; use one of {sorted(BUILDERS)}.")
  splits_lib.check_files(dataset, manual_dir)
  builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record", config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> list[Record]:
  """The `Record`s of a prepared split in `splits.paper_splits` order, read through `as_data_source` (no TensorFlow).

  TFDS shuffles examples when it writes them; the stored `position` restores the subset's order.
  """
  source = builder.as_data_source(split=split)
  examples = sorted((source[i] for i in range(len(source))), key=lambda ex: int(ex["position"]))
  return [Record.from_json(ex["record"]) for ex in examples]
