"""Hugging Face checkpoints: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`).

`load_hf_checkpoint(path, dtype=..., mesh=None)` builds the model by shape, then reads the safetensors lazily, one
tensor at a time, converts it to this package's einsum layout (see `transformer.py`), checks its shape, and places it
directly on its sharding (`jax.make_array_from_callback`), so no parameter is ever gathered on one device. With
`scan_layers=True` the L per-layer tensors `model.layers.{l}.*` of one block parameter are stacked into its
Lx... array on load and unstacked on save, so the files are the same in both layouts.
`save_hf_checkpoint(model, path, tokenizer=...)` writes the same format back (sharded above `max_shard_size`, with
the tokenizer and `generation_config.json`): `transformers` loads it, and loading it here is the identity.

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
import safetensors
import safetensors.numpy
from flax import nnx

from tsallis_jax.errors import InputError
from tsallis_jax.model.config import ModelConfig
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


def layer_paths(path: Path, cfg: ModelConfig) -> list[Path]:
  """The per-layer parameter paths one parameter of `Transformer` stands for, in layer order.

  Under `cfg.scan_layers` a block parameter ("layers", "attn", "q_proj") is stacked over a leading L axis and stands
  for the L unrolled paths ("layers", l, "attn", "q_proj"), each one Hugging Face tensor; any other path is itself.
  """
  if is_stacked(path, cfg):
    return [("layers", layer, *path[1:]) for layer in range(cfg.num_layers)]
  return [path]


def is_stacked(path: Path, cfg: ModelConfig) -> bool:
  """Whether the parameter at `path` holds all L layers along its leading axis (a block parameter under scan)."""
  return bool(cfg.scan_layers and path and path[0] == "layers")


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
    with safetensors.safe_open(single_path, framework="numpy") as f:
      return {name: single_path for name in f.keys()}
  raise CheckpointError(f"No weights in {folder}: expected {WEIGHTS_FILE} or {INDEX_FILE} (PyTorch .bin files are "
                        "not read; re-save them with save_pretrained(safe_serialization=True)).")


class _LazyTensors:
  """Opens each safetensors file once and reads tensors on demand (bfloat16 as `ml_dtypes.bfloat16`)."""

  def __init__(self, files: dict[str, pathlib.Path]):
    self._files = files
    self._readers: dict[pathlib.Path, Any] = {}

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def get(self, name: str) -> np.ndarray:
    file = self._files[name]
    if file not in self._readers:
      self._readers[file] = safetensors.safe_open(file, framework="numpy")
    return self._readers[file].get_tensor(name)


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
    values = []
    for one_path in layer_paths(path, cfg):  # L tensors stacked for a scanned block parameter, else one
      hf_name, hf_shape, to_ours, _ = hf_tensor_spec(one_path, cfg)
      tensor = get_tensor(hf_name)
      if tensor is None:
        raise CheckpointError(f"Tensor {hf_name!r} (for parameter {'/'.join(map(str, one_path))}) is missing from "
                              f"{source}.")
      if tuple(tensor.shape) != hf_shape:
        raise CheckpointError(f"Tensor {hf_name!r} in {source} has shape {tuple(tensor.shape)}; the config implies "
                              f"{hf_shape}. Check config.json against the weights.")
      values.append(np.asarray(to_ours(np.asarray(tensor))).astype(dtype))
    value = np.stack(values) if is_stacked(path, cfg) else values[0]
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
    host = _to_host(var.get_value())
    for layer, one_path in enumerate(layer_paths(path, cfg)):  # a stacked parameter gives its L per-layer tensors
      hf_name, hf_shape, _, to_hf = hf_tensor_spec(one_path, cfg)
      array = to_hf(host[layer] if is_stacked(path, cfg) else host)
      assert array.shape == hf_shape, (hf_name, array.shape, hf_shape)
      yield hf_name, np.ascontiguousarray(array)


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string such as "5GB" (decimal, as transformers' `max_shard_size`) or "512MiB"."""
  if isinstance(size, int):
    return size
  text = size.strip().upper().replace(" ", "")
  for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
    if text.endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
      return int(float(text[:-len(unit)]) * _SIZE_UNITS[unit])
  if text.isdigit():
    return int(text)
  raise ValueError(f"size {size!r} is not a byte count or a number with a unit (KB, MB, GB, KiB, MiB, GiB)")


def _shard_plan(specs: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  """Tensor names grouped, in order, into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
  shards: list[list[str]] = [[]]
  size = 0
  for name, nbytes in specs:
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def _token_ids(tokenizer: Any) -> dict[str, int | None]:
  ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
  return {k: (None if v is None else int(v)) for k, v in ids.items()}


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike, *, tokenizer: Any = None,
                       max_shard_size: int | str = "5GB", dtype: str | None = None,
                       max_position_embeddings: int | None = None,
                       generation: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes a folder that `transformers` (and `load_hf_checkpoint`) loads: config, weights, tokenizer, generation.

  Files: `config.json` (`dtype`, `max_position_embeddings` when given, bos/eos/pad ids from the tokenizer);
  `model.safetensors`, or above `max_shard_size` the shards `model-0000i-of-0000n.safetensors` with
  `model.safetensors.index.json` (HF names and layout); with a tokenizer, its files (`save_pretrained`, added tokens
  such as `<think>` included) and `generation_config.json` (its ids plus `generation`, e.g. temperature / top_k).
  Weight files of the other layout left in `path` by an earlier save are removed, so loaders never read stale ones.

  Args:
    dtype: the stored dtype ("float32" / "bfloat16"); None keeps the parameters' dtype.

  Returns the folder. Parameters are gathered to the host one by one; on several hosts call it on every process
  (the gather is collective): only process 0 writes. Each file is written to a temporary name and renamed.
  """
  folder = pathlib.Path(path)
  cfg = model.config
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  specs = [(hf_tensor_spec(one, cfg)[0], int(np.prod(v.get_value().shape)) * out_dtype.itemsize // len(paths))
           for p, v in params for paths in [layer_paths(p, cfg)] for one in paths]
  plan = _shard_plan(specs, parse_size(max_shard_size))
  main = jax.process_index() == 0
  if main:
    folder.mkdir(parents=True, exist_ok=True)
  files = ([WEIGHTS_FILE] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  shard_of = {name: i for i, names in enumerate(plan) for name in names}
  pending: dict[str, np.ndarray] = {}
  for name, array in hf_tensors(model):  # every process iterates: the gathers are collective
    if not main:
      continue
    pending[name] = array.astype(out_dtype, copy=False)
    shard = shard_of[name]
    if all(n in pending for n in plan[shard]):
      tmp = folder / (files[shard] + ".tmp")
      safetensors.numpy.save_file({n: pending.pop(n) for n in plan[shard]}, str(tmp), metadata={"format": "pt"})
      os.chmod(tmp, 0o644)  # the writer creates files owner-only; an export is meant to be shared
      os.replace(tmp, folder / files[shard])
  if not main:
    return folder

  def write_json(name: str, value: dict[str, Any]) -> None:
    tmp = folder / (name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, folder / name)

  stale = {folder / WEIGHTS_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")}
  if len(plan) > 1:
    write_json(INDEX_FILE, {"metadata": {"total_size": sum(n for _, n in specs)},
                            "weight_map": {name: files[shard_of[name]] for name, _ in specs}})
  for file in stale - {folder / f for f in files} - ({folder / INDEX_FILE} if len(plan) > 1 else set()):
    file.unlink(missing_ok=True)
  hf = cfg.to_hf_config()
  hf["dtype"] = out_dtype.name
  if max_position_embeddings is not None:
    hf["max_position_embeddings"] = int(max_position_embeddings)
  if tokenizer is not None:
    hf.update(_token_ids(tokenizer))
  write_json(CONFIG_FILE, hf)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(folder))
    write_json("generation_config.json", {**_token_ids(tokenizer), **(generation or {})})
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
