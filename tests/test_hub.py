"""`model_path` as a Hugging Face Hub id, resolved from a populated fake cache (the Hub is unreachable in tests)."""
import pathlib

import numpy as np
import pytest

from tsallis_jax.model import ModelConfig, create_model, save_hf_checkpoint
from tsallis_jax.model.hub import ModelPathError, parse_hub_id, resolve_model_path
from tsallis_jax.model.build import build_model
from tsallis_jax.train.config import TrainConfig, model_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _checkpoint(folder: pathlib.Path, seed: int) -> None:
  from tsallis_jax.data import synthetic
  tok = synthetic.make_tokenizer()
  tok.save_pretrained(folder)
  save_hf_checkpoint(create_model(ModelConfig.tiny(vocab_size=len(tok)), seed=seed), folder)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An HF cache holding `org/tiny` at `main` (the layout huggingface_hub writes), offline mode on."""
  from huggingface_hub import constants
  cache = tmp_path / "hub"
  repo = cache / "models--org--tiny"
  _checkpoint(repo / "snapshots" / COMMIT, seed=0)
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(COMMIT)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.chdir(tmp_path)
  return cache


def test_hub_id_grammar():
  assert parse_hub_id("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
  assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
  for text in ("name", "/abs/path", "./org/name", "a/b/c", "org/na--me", "org/name.git", "~/models/x", ""):
    assert parse_hub_id(text) is None, text


def test_hub_id_resolves_from_the_offline_cache_and_trains_the_same_model(hub_cache):
  snapshot = hub_cache / "models--org--tiny" / "snapshots" / COMMIT
  assert resolve_model_path("org/tiny").resolve() == snapshot.resolve()
  assert resolve_model_path(f"org/tiny@{COMMIT}").resolve() == snapshot.resolve()
  by_id, tok = build_model(model_spec(TrainConfig(model="hf", model_path="org/tiny")))
  by_folder, _ = build_model(model_spec(TrainConfig(model="hf", model_path=str(snapshot))))
  np.testing.assert_array_equal(np.asarray(by_id.embed[...]), np.asarray(by_folder.embed[...]))
  assert tok.convert_tokens_to_ids("</think>") != tok.unk_token_id


def test_an_existing_local_folder_wins_over_the_hub_id(hub_cache):
  _checkpoint(pathlib.Path("org/tiny"), seed=1)  # relative to the cwd, the same text as the cached id
  assert resolve_model_path("org/tiny") == pathlib.Path("org/tiny")
  local, _ = build_model(model_spec(TrainConfig(model="hf", model_path="org/tiny")))
  cached, _ = build_model(model_spec(TrainConfig(model="hf", model_path=str(
      hub_cache / "models--org--tiny" / "snapshots" / COMMIT))))
  assert not np.array_equal(np.asarray(local.embed[...]), np.asarray(cached.embed[...]))


def test_unresolvable_paths_name_both_options(hub_cache):
  with pytest.raises(ModelPathError, match=r"org/missing.*no local path.*not in the cache.*HF_HUB_OFFLINE.*local "
                                           r"folder.*hf download org/missing"):
    resolve_model_path("org/missing")
  with pytest.raises(ModelPathError, match=r"neither an existing local path nor a Hugging Face Hub id"):
    resolve_model_path("./models/missing/folder")
  with pytest.raises(ValueError, match="org/missing"):  # through the trainer's loader as well
    build_model(model_spec(TrainConfig(model="hf", model_path="org/missing")))
