"""A training workdir -> a Hugging Face folder that `transformers` loads (and, optionally, a Hub upload).

`export_workdir(workdir, out, best=False)` rebuilds the run's model and tokenizer from `workdir/config.json` the
way `loop.setup` does (a preset sized to the task tokenizer, or the HF / GGUF model with `<think>` / `</think>`
added), reads only the params of the newest step of `workdir/checkpoints` (or of `workdir/best` with `best=True`)
and writes them with `hf_io.save_hf_checkpoint`: safetensors (sharded with an index above `max_shard_size`),
`config.json` (`dtype`, `max_position_embeddings`, bos/eos/pad ids), the tokenizer with the tokens the run added,
and `generation_config.json` with the run's evaluation sampling settings.

`max_position_embeddings`: the source checkpoint's for `model=hf` / `gguf`; for presets the model family's
(Qwen3-0.6B 40960, SmolLM2 8192); for the `tiny` preset the longest sequence the run trained on (`total_len`),
since nothing longer was ever seen.

The workdir is only read: nothing is moved, renamed or written there (unlike the trainer's restore, which moves
damaged steps aside).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from tsallis_jax.errors import InputError
from tsallis_jax.data import prompts
from tsallis_jax.model import ModelConfig
from tsallis_jax.model import build as model_build
from tsallis_jax.model.hf_io import save_hf_checkpoint
from tsallis_jax.train import checkpoint as ckpt_lib
from tsallis_jax.train import state as state_lib
from tsallis_jax.train.config import TrainConfig, model_spec
from tsallis_jax.train.tasks import build_task

PRESET_MAX_POSITIONS = {"qwen3_0_6b": 40_960, "smollm2_135m": 8_192}


class ExportError(InputError):
  """A workdir that cannot be exported: no config.json, no checkpoint, or params of another model."""


def read_run_config(workdir: str | os.PathLike) -> TrainConfig:
  """The `TrainConfig` a run wrote to `workdir/config.json` (validated; unknown keys are a ConfigError)."""
  path = ckpt_lib.resolve_workdir(workdir) / "config.json"
  if not path.exists():
    raise ExportError(f"{path} is missing: --workdir must be a training run folder (train_and_evaluate writes "
                      "config.json, checkpoints/ and best/ there).")
  return TrainConfig().replace(**json.loads(path.read_text()))


def rebuild_model(cfg: TrainConfig) -> tuple[Any, Any, int]:
  """(abstract or loaded model, tokenizer, max_position_embeddings) of a run, as `loop.setup` builds them."""
  spec = model_spec(cfg)
  if spec.pretrained:
    model, tokenizer = model_build.build_model(spec)
    known = model_build.max_positions(spec)
  else:
    tokenizer = build_task(cfg).tokenizer
    model, _ = model_build.build_model(spec, tokenizer=tokenizer, abstract=True)
    known = PRESET_MAX_POSITIONS.get(cfg.model)
  return model, tokenizer, int(known or cfg.total_len(len(prompts.close_tag_ids(tokenizer))))


def _step_dir(workdir: str | os.PathLike, best: bool) -> tuple[int, Any]:
  root = ckpt_lib.resolve_workdir(workdir) / ("best" if best else "checkpoints")
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
  steps = [s for s in steps if (root / str(s) / "state").exists()]
  if not steps:
    what = "best-by-validation checkpoint (runs with eval_every > 0 write one)" if best else "checkpoint"
    raise ExportError(f"no {what} in {root}; train first, or {'drop --best' if best else 'pass --best'}.")
  return steps[-1], root / str(steps[-1]) / "state"


def restore_params(state_dir: Any, abstract_params: Any) -> Any:
  """Only the params of a saved `TrainState` (orbax partial restore), on the default device."""
  checkpointer = ocp.PyTreeCheckpointer()
  stored = ckpt_lib._shapes(checkpointer.metadata(state_dir).item_metadata["params"])
  wanted = ckpt_lib._shapes(abstract_params)
  if stored != wanted:
    diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    raise ExportError(f"the params in {state_dir} do not match the model rebuilt from config.json ({len(diff)} "
                      f"differ, e.g. {[(k, stored.get(k), wanted.get(k)) for k in diff[:3]]}); was config.json "
                      "edited after training?")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
  item = {"params": target}
  out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  return out["params"]


def _with_stored_layout(cfg: TrainConfig, state_dir: Any) -> TrainConfig:
  """`cfg` with `scan_layers` set to the layout the checkpoint's params were written in (stacked or per layer), so
  a run from either layout exports to the same Hugging Face files."""
  try:
    names = ckpt_lib._shapes(ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata["params"])
  except Exception:  # noqa: BLE001 (unreadable metadata: restore_params reports it)
    return cfg
  stored = ckpt_lib._layer_layout(names)
  configured = model_build.typed_overrides(model_spec(cfg).overrides).get("scan_layers", ModelConfig.scan_layers)
  if stored is None or stored == configured:
    return cfg
  kept = [item for item in cfg.model_overrides.split(",") if item.strip() and
          item.split("=", 1)[0].strip() != "scan_layers"]
  return cfg.replace(model_overrides=",".join([*kept, f"scan_layers={str(stored).lower()}"]))


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *, best: bool = False,
                   dtype: str | None = None, max_shard_size: int | str = "5GB") -> tuple[pathlib.Path, int]:
  """Writes the run's newest (or best) params as a Hugging Face folder at `out`; returns (folder, step)."""
  cfg = read_run_config(workdir)
  step, state_dir = _step_dir(workdir, best)
  cfg = _with_stored_layout(cfg, state_dir)
  model, tokenizer, max_positions = rebuild_model(cfg)
  close_tag_len = len(prompts.close_tag_ids(tokenizer))
  graphdef, abstract_vars = nnx.split(model)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_lib.pure(abstract_vars))
  params = restore_params(state_dir, abstract_params)
  del model
  trained = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  generation = {"do_sample": True, "temperature": cfg.eval_temperature, "top_k": cfg.eval_top_k,
                "top_p": cfg.eval_top_p, "max_new_tokens": cfg.rollout_len(close_tag_len)}
  folder = save_hf_checkpoint(trained, out, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=dtype,
                              max_position_embeddings=max_positions, generation=generation)
  return folder, step


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                commit_message: str | None = None) -> Any:
  """Creates `repo_id` if needed and uploads `folder` (`huggingface_hub.HfApi().upload_folder`); needs a token."""
  from huggingface_hub import HfApi
  api = HfApi()
  api.create_repo(repo_id, private=private, exist_ok=True)
  return api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                           commit_message=commit_message or "Upload tsallis_jax export")

