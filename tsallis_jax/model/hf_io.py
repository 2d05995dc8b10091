"""Hugging Face checkpoints: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`).

`load_hf_checkpoint(path, dtype=..., mesh=None)` builds the model by shape, then reads the safetensors lazily, one
tensor at a time, converts it to this package's einsum layout (see `transformer.py`), checks its shape, and places it
directly on its sharding (`jax.make_array_from_callback`), so no parameter is ever gathered on one device.
`save_hf_checkpoint(model, path)` writes the same format back; loading what it wrote is the identity.

The tokenizer is read from the same folder with `transformers.AutoTokenizer` (offline; `jinja2` renders chat
templates): `load_tokenizer(path)`.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tsallis_jax.errors import InputError
from tsallis_jax.model import safetensors_np
from tsallis_jax.model.config import ModelConfig
from tsallis_jax.model.safetensors_np import SafetensorsFile
from tsallis_jax.model.sharding import param_shardings
from tsallis_jax.model.transformer import Transformer, abstract_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Path = tuple[Any, ...]


class CheckpointError(InputError):
  """A checkpoint that cannot be loaded: a missing file, a missing or mis-shaped tensor, an unknown architecture."""


# ---------------------------------------------------------------------------------------------------- name mapping


def hf_tensor_spec(path: Path, cfg: ModelConfig) -> tuple[str, tuple[int, ...], Callable, Callable]:
  """For one parameter path of `Transformer`: (HF tensor name, HF shape, hf_to_ours, ours_to_hf).

  HF linear weights are (out, in); so are ours, with the output axis split per head, so the converters only reshape.
  """
  d, f, v = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = (lambda x: x, lambda x: x)

  def linear_in_heads(heads):  # HF (heads*E, D) <-> ours (heads, E, D)
    return (lambda x: x.reshape(heads, e, d), lambda x: x.reshape(heads * e, d))

  if path == ("embed",):
    return ("model.embed_tokens.weight", (v, d), *same)
  if path == ("final_norm",):
    return ("model.norm.weight", (d,), *same)
  if path == ("lm_head",):
    return ("lm_head.weight", (v, d), *same)
  if len(path) < 3 or path[0] != "layers":
    raise CheckpointError(f"No Hugging Face name for parameter {path}.")
  prefix = f"model.layers.{path[1]}."
  rest = tuple(path[2:])
  table = {
    ("attn_norm",): ("input_layernorm.weight", (d,), *same),
    ("mlp_norm",): ("post_attention_layernorm.weight", (d,), *same),
    ("attn", "q_proj"): ("self_attn.q_proj.weight", (h * e, d), *linear_in_heads(h)),
    ("attn", "k_proj"): ("self_attn.k_proj.weight", (k * e, d), *linear_in_heads(k)),
    ("attn", "v_proj"): ("self_attn.v_proj.weight", (k * e, d), *linear_in_heads(k)),
    ("attn", "o_proj"): ("self_attn.o_proj.weight", (d, h * e),
                         lambda x: x.reshape(d, h, e), lambda x: x.reshape(d, h * e)),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", (h * e,), lambda x: x.reshape(h, e), lambda x: x.reshape(h * e)),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", (k * e,), lambda x: x.reshape(k, e), lambda x: x.reshape(k * e)),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", (k * e,), lambda x: x.reshape(k, e), lambda x: x.reshape(k * e)),
    ("attn", "q_norm"): ("self_attn.q_norm.weight", (e,), *same),
    ("attn", "k_norm"): ("self_attn.k_norm.weight", (e,), *same),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", (f, d), *same),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", (f, d), *same),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", (d, f), *same),
  }
  if rest not in table:
    raise CheckpointError(f"No Hugging Face name for parameter {path}.")
  name, shape, to_ours, to_hf = table[rest]
  return (prefix + name, shape, to_ours, to_hf)


# ---------------------------------------------------------------------------------------------------- reading


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  folder = pathlib.Path(path)
  config_path = folder / CONFIG_FILE
  if not config_path.is_file():
    raise CheckpointError(f"{config_path} is missing: a Hugging Face checkpoint folder needs config.json beside its "
                          f"{WEIGHTS_FILE} (or {INDEX_FILE}).")
  return json.loads(config_path.read_text())


def _weight_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the safetensors file holding it."""
  index_path, single_path = folder / INDEX_FILE, folder / WEIGHTS_FILE
  if index_path.is_file():
    weight_map = json.loads(index_path.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path} has no 'weight_map' dict.")
    files = {name: folder / file for name, file in weight_map.items()}
    for file in set(files.values()):
      if not file.is_file():
        raise CheckpointError(f"{file} is listed in {index_path} but missing.")
    return files
  if single_path.is_file():
    return {name: single_path for name in SafetensorsFile(single_path).keys()}
  raise CheckpointError(f"No weights in {folder}: expected {WEIGHTS_FILE} or {INDEX_FILE} (PyTorch .bin files are "
                        "not read; re-save them with save_pretrained(safe_serialization=True)).")


class _LazyTensors:
  """Memory-maps each safetensors file once and reads tensors on demand (bfloat16 as `ml_dtypes.bfloat16`)."""

  def __init__(self, files: dict[str, pathlib.Path]):
    self._files = files
    self._readers: dict[pathlib.Path, SafetensorsFile] = {}

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def get(self, name: str) -> np.ndarray:
    file = self._files[name]
    if file not in self._readers:
      self._readers[file] = SafetensorsFile(file)
    return self._readers[file].get(name)


def _place(array: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def build_from_tensors(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray | None], *,
                       mesh: jax.sharding.Mesh | None = None, source: str = "checkpoint") -> Transformer:
  """Builds a `Transformer` by shape and fills it tensor by tensor from HF-named arrays.

  Args:
    cfg: the model config.
    get_tensor: HF tensor name -> numpy array, or None when the checkpoint lacks it.
    mesh: place each parameter on its sharding from `cfg.sharding_rules`; None keeps the default device.
    source: the checkpoint's name, for error messages.
  """
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  shardings = None if mesh is None else param_shardings(abstract_state, mesh, cfg.sharding_rules)
  flat_shardings = None if shardings is None else dict(nnx.to_flat_state(shardings))
  dtype = cfg.weight_dtype
  leaves = []
  for path, var in nnx.to_flat_state(abstract_state):
    hf_name, hf_shape, to_ours, _ = hf_tensor_spec(path, cfg)
    tensor = get_tensor(hf_name)
    if tensor is None:
      raise CheckpointError(f"Tensor {hf_name!r} (for parameter {'/'.join(map(str, path))}) is missing from {source}.")
    if tuple(tensor.shape) != hf_shape:
      raise CheckpointError(f"Tensor {hf_name!r} in {source} has shape {tuple(tensor.shape)}; the config implies "
                            f"{hf_shape}. Check config.json against the weights.")
    value = np.asarray(to_ours(np.asarray(tensor))).astype(dtype)
    sharding = None if flat_shardings is None else flat_shardings[path]
    leaves.append((path, var.replace(_place(value, sharding))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
                       mesh: jax.sharding.Mesh | None = None, **config_changes: Any) -> Transformer:
  """Loads a Qwen3 / Qwen2 / Llama Hugging Face checkpoint folder into a `Transformer`.

  Args:
    path: folder with `config.json` and `model.safetensors` or `model.safetensors.index.json` (+ its shards).
    dtype: compute dtype ("float32" or "bfloat16"); logits stay float32.
    param_dtype: storage dtype of the parameters.
    mesh: shard each parameter over this mesh by the config's logical-axis rules while loading.
    **config_changes: other `ModelConfig` fields to override (e.g. `remat=True`, `sharding_rules=...`).

  Tied embeddings: when `tie_word_embeddings` is true, `lm_head.weight` is ignored if present (HF drops it on save).
  Any other tensor the model has no place for (e.g. layers beyond `num_hidden_layers`) is an error.

  Raises:
    CheckpointError (a ValueError): missing config or weights, an unknown `model_type`, a missing or unexpected
      tensor or one whose shape disagrees with the config; each message names the file or tensor.
  """
  folder = pathlib.Path(path)
  cfg = ModelConfig.from_hf_config(read_hf_config(folder), dtype=dtype, param_dtype=param_dtype, **config_changes)
  files = _weight_files(folder)
  tensors = _LazyTensors(files)
  used: set[str] = set()

  def get_tensor(name: str) -> np.ndarray | None:
    used.add(name)
    return tensors.get(name) if name in tensors else None

  model = build_from_tensors(cfg, get_tensor, mesh=mesh, source=str(folder))
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unused = sorted(n for n in set(files) - used - ignorable if not n.endswith("rotary_emb.inv_freq"))
  if unused:
    raise CheckpointError(f"{len(unused)} tensors in {folder} have no place in the model built from its config.json "
                          f"(e.g. {unused[:4]}); the config disagrees with the weights or the architecture has "
                          "parts this model lacks.")
  return model


# ---------------------------------------------------------------------------------------------------- writing


def _to_host(value: jax.Array) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:  # multi-host: every process gets it all
    from jax.experimental import multihost_utils
    value = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(jax.device_get(value))


def hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy array) for every parameter, in HF layout, gathered to the host one parameter at a time."""
  cfg = model.config
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    hf_name, hf_shape, _, to_hf = hf_tensor_spec(path, cfg)
    array = to_hf(_to_host(var.get_value()))
    assert array.shape == hf_shape, (hf_name, array.shape, hf_shape)
    yield hf_name, np.ascontiguousarray(array)


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike) -> pathlib.Path:
  """Writes `config.json` and `model.safetensors` (HF names and layout, the parameters' dtype) into `path`.

  Returns the folder. Parameters are gathered to the host one by one; on several hosts call it on every process
  (the gather is collective): only process 0 writes.

  Files are written to temporary names and renamed, so a crash never leaves a half-written checkpoint.
  """
  folder = pathlib.Path(path)
  tensors = dict(hf_tensors(model))
  if jax.process_index() != 0:
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  tmp_weights = folder / (WEIGHTS_FILE + ".tmp")
  safetensors_np.save(tensors, tmp_weights)
  tmp_config = folder / (CONFIG_FILE + ".tmp")
  tmp_config.write_text(json.dumps(model.config.to_hf_config(), indent=2))
  os.replace(tmp_weights, folder / WEIGHTS_FILE)
  os.replace(tmp_config, folder / CONFIG_FILE)
  return folder


def load_tokenizer(path: str | os.PathLike):
  """`transformers.AutoTokenizer` from the checkpoint folder, offline (`local_files_only=True`)."""
  from transformers import AutoTokenizer
  files = ("tokenizer.json", "tokenizer.model", "vocab.json")
  if not pathlib.Path(path).is_dir() or not any((pathlib.Path(path) / f).is_file() for f in files):
    # transformers would build an empty tokenizer from config.json alone and training would run on nothing.
    raise CheckpointError(f"no tokenizer in {path}: expected one of {list(files)} (the files "
                          "tokenizer.save_pretrained writes); copy them from the model's repository")
  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:  # transformers' "can't load tokenizer" errors
    raise CheckpointError(f"no usable tokenizer in {path} ({type(e).__name__}: {' '.join(str(e).split())[:300]}); the "
                          "folder needs tokenizer.json or the files save_pretrained writes (tokenizer_config.json, "
                          "vocab/merges)") from None
