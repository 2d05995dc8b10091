"""`model_path` as a local folder or a Hugging Face Hub id (`org/name`), resolved to a local folder.

Rule (`resolve_model_path`):
  1. a local path that exists wins, even when it also reads as a Hub id (`Qwen/Qwen3-0.6B` relative to the cwd);
  2. else a Hub id `org/name` (optionally `org/name@revision`) goes through `huggingface_hub.snapshot_download`,
     which reads the local cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`) and honours
     `HF_HUB_OFFLINE=1` (cache only, no network); only the files a checkpoint folder needs are fetched;
  3. anything else, or an id that is neither cached nor downloadable, is a `ModelPathError` naming both options.
"""
from __future__ import annotations

import os
import pathlib
import re

from tsallis_jax.model.hf_io import CheckpointError

# What `load_hf_checkpoint` and `load_tokenizer` read: config, weights (safetensors only), tokenizer, chat template.
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")

# The Hub's repo-id grammar (huggingface_hub.utils.validate_repo_id) with the namespace required: org/name.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9._/-]+))?$")


class ModelPathError(CheckpointError):
  """`model_path` is neither an existing local path nor a Hub id that can be resolved."""


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
  """(repo_id, revision or None) when `text` reads as `org/name[@revision]`, else None."""
  match = _HUB_ID.match(text)
  if match is None or "--" in match["repo"] or ".." in match["repo"] or match["repo"].endswith(".git"):
    return None
  return match["repo"], match["revision"]


def _offline() -> bool:
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE)


def resolve_model_path(model_path: str | os.PathLike) -> pathlib.Path:
  """The local folder (or file) for `model_path`: an existing local path, else a Hub id resolved via the cache.

  Raises:
    ModelPathError (a ValueError): the path does not exist and is not an `org/name` id, or the id is not in the
      cache while offline (or cannot be downloaded); the message names both options and the cache folder.
  """
  text = os.fspath(model_path)
  local = pathlib.Path(text).expanduser()
  if local.exists():
    return local
  parsed = parse_hub_id(text)
  if parsed is None:
    raise ModelPathError(
        f"model_path {text!r} is neither an existing local path nor a Hugging Face Hub id of the form org/name "
        "(e.g. Qwen/Qwen3-0.6B); give a folder holding config.json and the safetensors, or a Hub id.")
  repo_id, revision = parsed
  import huggingface_hub
  from huggingface_hub import constants, errors
  try:
    folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_PATTERNS))
  except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled, OSError) as e:
    offline = ("HF_HUB_OFFLINE is set, so only the local cache is read" if _offline()
               else "the Hub could not be reached or refused the download")
    raise ModelPathError(
        f"model_path {text!r}: no local path of that name exists, and as a Hugging Face Hub id it is not in the "
        f"cache {constants.HF_HUB_CACHE} ({offline}; {type(e).__name__}: {str(e)[:200]}). Either give a local "
        f"folder (config.json + safetensors + tokenizer), or put the model in the cache first (on a machine with "
        f"network: `hf download {repo_id}`, with the same HF_HUB_CACHE / HF_HOME).") from None
  return pathlib.Path(folder)
