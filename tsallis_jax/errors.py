"""The error base for bad inputs: what the CLI turns into one line on stderr and exit status 2.

Every error a user can fix by changing an input (a config key, the data folder, a record, a model or tokenizer file,
the workdir) subclasses `InputError` (a `ValueError`), wherever it is raised: `ConfigError` (here: a config key,
used by train/config.py and model/build.py),
`RecordError` and `BudgetError` (data/records.py), `CheckpointError` (model/hf_io.py), `WorkdirError`
(train/workdir.py). `experiments/train.py` catches `InputError`, prints its message on one line and exits with
status 2, never a traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
  """A bad input the user can fix; the message names the problem and the fix."""


class MissingFileError(InputError, FileNotFoundError):
  """A required input file or folder does not exist (also a `FileNotFoundError`)."""


class ConfigError(InputError):
  """An unknown key or an impossible value in a `TrainConfig` or a model spec (a `ValueError`)."""
