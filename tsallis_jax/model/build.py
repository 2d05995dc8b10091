"""`build_model(spec, mesh)`: the model a run trains, from a `ModelSpec` (a preset, or HF / GGUF weights).

    spec = ModelSpec("hf", model_path="Qwen/Qwen3-0.6B", dtype="bfloat16", overrides=(("remat", "true"),))
    model, tokenizer = build_model(spec, mesh)                      # weights on the mesh, the checkpoint's tokenizer
    model, tokenizer = build_model(ModelSpec("tiny"), mesh, tokenizer=task_tokenizer, abstract=True)   # shapes only

* A preset (`tiny`, `qwen3_0_6b`, `smollm2_135m`) is sized to the given tokenizer's vocabulary and initialised from
  `spec.seed` on the mesh (or only its shapes, `abstract=True`: nothing is allocated).
* `hf` (a folder or a Hub id `org/name`, `hub.resolve_model_path`) and `gguf` (a file, or `smollm2` for the cached
  SmolLM2 GGUF, converted once to an HF folder) load the weights and the tokenizer; a tokenizer without `<think>` /
  `</think>` gets both as special tokens and the embedding grows to match (`with_think_tokens`), so the closing tag
  is one token of every loaded model (a tokenizer whose tag is several tokens also trains: `Task.close_tag_ids`).
* `overrides` change scalar `ModelConfig` fields of presets and checkpoints alike (`remat`, `attention_query_chunk`).

The train layer maps its `TrainConfig` onto a `ModelSpec` (`tsallis_jax.train.config.model_spec`); this module
imports nothing from `tsallis_jax.train`.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tsallis_jax.errors import ConfigError
from tsallis_jax.model.config import ModelConfig, remat_policy_name
from tsallis_jax.model.transformer import abstract_model, create_model, pure

PRESETS = {"tiny": ModelConfig.tiny, "qwen3_0_6b": ModelConfig.qwen3_0_6b, "smollm2_135m": ModelConfig.smollm2_135m}
PRETRAINED = ("hf", "gguf")
_OVERRIDE_TYPES = {"int": int, "float": float, "str": str}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What names a model: a preset or `hf` / `gguf` with `model_path`, the compute dtype, `ModelConfig` overrides
  as (key, text) pairs ("remat", "true"), and the seed of a preset's random initialisation."""
  model: str
  model_path: str = ""
  dtype: str = "float32"
  overrides: tuple[tuple[str, str], ...] = ()
  seed: int = 0

  @property
  def pretrained(self) -> bool:
    """True for `hf` / `gguf` (weights and tokenizer from files), False for a preset (random init)."""
    return self.model in PRETRAINED


def typed_overrides(overrides: tuple[tuple[str, str], ...] | dict[str, str]) -> dict[str, Any]:
  """("remat", "true"), ("attention_query_chunk", "512") -> typed ModelConfig changes.

  Only scalar fields can be overridden; "none" clears an optional one. Raises `ConfigError` naming the key."""
  fields = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
  scalar = {k: t for k, t in fields.items() if t.split(" | ")[0] in ("bool", *_OVERRIDE_TYPES)}
  changes: dict[str, Any] = {}
  for k, text in dict(overrides).items():
    if k not in scalar:
      raise ConfigError(f"model_overrides key {k!r} is not a scalar ModelConfig field; valid: {sorted(scalar)}")
    kind, _, optional = scalar[k].partition(" | ")
    if k == "remat":  # a policy name, or the old true / false
      try:
        changes[k] = remat_policy_name(text)
      except ValueError as e:
        raise ConfigError(f"model_overrides {k}={text!r}: {e}") from None
    elif optional == "None" and text.lower() == "none":
      changes[k] = None
    elif kind == "bool":
      if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ConfigError(f"model_overrides {k}={text!r}: expected true or false")
      changes[k] = text.lower() in ("1", "true", "yes")
    else:
      try:
        changes[k] = _OVERRIDE_TYPES[kind](text)
      except ValueError:
        raise ConfigError(f"model_overrides {k}={text!r}: expected a {kind}") from None
  return changes


def preset_config(spec: ModelSpec, vocab_size: int | None = None) -> ModelConfig:
  """The ModelConfig preset with the spec's dtype and overrides (and the tokenizer's vocabulary)."""
  if spec.model not in PRESETS:
    raise ConfigError(f"model={spec.model!r} is not a preset {sorted(PRESETS)} nor 'hf' / 'gguf'")
  changes: dict[str, Any] = {"dtype": spec.dtype}
  if vocab_size is not None:
    changes["vocab_size"] = vocab_size
  changes.update(typed_overrides(spec.overrides))
  return PRESETS[spec.model](**changes)


def checkpoint_folder(spec: ModelSpec) -> pathlib.Path:
  """The HF folder of an `hf` / `gguf` spec (a Hub id through the HF cache; a GGUF file converted once)."""
  if spec.model == "hf":
    from tsallis_jax.model.hub import resolve_model_path
    return resolve_model_path(spec.model_path)  # a local folder wins; else an org/name Hub id via the cache
  if spec.model == "gguf":
    from tsallis_jax.model import gguf_io
    return gguf_io.cached_hf_folder(gguf_io.smollm2_gguf_path() if spec.model_path == "smollm2" else spec.model_path)
  raise ConfigError(f"model={spec.model!r} has no checkpoint folder (only 'hf' / 'gguf' do)")


def max_positions(spec: ModelSpec) -> int | None:
  """The checkpoint's `max_position_embeddings` (read from config.json, no weights), or None for a preset."""
  if not spec.pretrained:
    return None
  from tsallis_jax.model.hf_io import read_hf_config
  return read_hf_config(checkpoint_folder(spec)).get("max_position_embeddings")


def build_model(spec: ModelSpec, mesh=None, *, tokenizer: Any = None, abstract: bool = False
                ) -> tuple[nnx.Module, Any]:
  """(model, tokenizer) of `spec` (see the module docstring); `mesh` places the parameters (None: one device).

  Presets need `tokenizer` (its vocabulary sizes the embedding) and return it unchanged; `hf` / `gguf` return the
  checkpoint's tokenizer (with `<think>` / `</think>`) and take no `tokenizer`. `abstract=True` (presets only)
  returns the model's shapes (`abstract_model`) without allocating it."""
  if not spec.pretrained:
    if tokenizer is None:
      raise ConfigError(f"model={spec.model!r} is a preset: its vocabulary comes from the task's tokenizer; pass it")
    mcfg = preset_config(spec, vocab_size=len(tokenizer))
    model = abstract_model(mcfg, seed=spec.seed) if abstract else create_model(mcfg, seed=spec.seed, mesh=mesh)
    return model, tokenizer
  if tokenizer is not None or abstract:
    raise ValueError(f"model={spec.model!r} loads its own tokenizer and weights: pass neither tokenizer nor abstract")
  from tsallis_jax.model.hf_io import load_hf_checkpoint, load_tokenizer
  folder = checkpoint_folder(spec)
  model = load_hf_checkpoint(folder, dtype=spec.dtype, mesh=mesh, **typed_overrides(spec.overrides))
  return with_think_tokens(model, load_tokenizer(folder), mesh)


def with_think_tokens(model: nnx.Module, tokenizer: Any, mesh=None) -> tuple[nnx.Module, Any]:
  """Adds `<think>` / `</think>` to a tokenizer that lacks them (SmolLM2) and grows the embedding to match.

  New rows are the mean of the existing embeddings (a neutral start); the tied LM head follows. Qwen3 has both tokens
  and is returned unchanged.
  """
  close = tokenizer.convert_tokens_to_ids("</think>")
  if close is not None and close != tokenizer.unk_token_id:
    return model, tokenizer
  tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
  old = model.config
  new_cfg = old.replace(vocab_size=max(len(tokenizer), old.vocab_size))
  params = pure(nnx.state(model))
  embed = np.asarray(jax.device_get(params["embed"]))
  extra = np.repeat(embed.mean(0, keepdims=True), new_cfg.vocab_size - old.vocab_size, axis=0)
  params["embed"] = np.concatenate([embed, extra], axis=0)
  if not old.tie_embeddings:
    head = np.asarray(jax.device_get(params["lm_head"]))
    params["lm_head"] = np.concatenate([head, np.zeros((head.shape[0], extra.shape[0]), head.dtype)], axis=1)
  graphdef, _ = nnx.split(abstract_model(new_cfg))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params)), tokenizer
