"""HF checkpoint loading: parity with transformers' PyTorch models, sharded loading, round trip, errors, workload."""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax import distributed
from tsallis_jax.model import (CheckpointError, load_hf_checkpoint, load_tokenizer, make_attention_mask,
                               make_positions, save_hf_checkpoint)

# The shared reference workload's builder lies in ../shared/bench beside the checkout (CI lays a copy there).
BENCH_SCRIPT = next((p for p in (pathlib.Path(__file__).resolve().parents[2] / "shared/bench/make_workload.py",
                                 pathlib.Path("/work/shared/bench/make_workload.py")) if p.is_file()),
                    pathlib.Path("../shared/bench/make_workload.py"))
# Logits at the last position for ids [5, 6, 7], ids 0..4, from shared/bench/README.md.
BENCH_LOGITS = [-0.0088225, -0.0161941, -0.4281750, -0.0194368, -0.3160955]

TOKENS_NxT = np.array([[3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 5, 6, 7, 8], [0, 10, 11, 12, 13, 14, 15]])


@nnx.jit
def _forward(model, tokens_NxT, pad_mask_NxT):
  return model(tokens_NxT, make_positions(pad_mask_NxT), make_attention_mask(pad_mask_NxT))[0]


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 16.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _hf_model(arch: str, folder: pathlib.Path, *, tie: bool, max_shard_size=None, rope_parameters=None):
  """A tiny random transformers model of `arch`, saved with save_pretrained; returns the torch model."""
  torch = pytest.importorskip("torch")
  import transformers
  classes = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
             "llama": ("LlamaConfig", "LlamaForCausalLM")}
  config_cls, model_cls = (getattr(transformers, name) for name in classes[arch])
  config = config_cls(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 5000.0},
                      tie_word_embeddings=tie)
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():  # every parameter random (norm weights and biases included) so layouts are exercised
    for param in model.parameters():
      param.normal_(0.0, 0.1)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(folder, **kwargs)
  return model


def _torch_logits(model, tokens_NxT, pad_NxT):
  import torch
  positions = np.maximum(np.cumsum(pad_NxT, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens_NxT), attention_mask=torch.tensor(pad_NxT.astype(np.int64)),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


@pytest.mark.torch
@pytest.mark.parametrize("arch, tie, rope", [("qwen3", True, None), ("qwen2", False, None), ("llama", False, None),
                                             ("llama", True, LLAMA3_ROPE)])
def test_logits_match_transformers_with_and_without_padding(tmp_path, arch, tie, rope):
  torch_model = _hf_model(arch, tmp_path, tie=tie, rope_parameters=rope)
  model = load_hf_checkpoint(tmp_path)
  assert model.config.arch == arch and model.config.tie_embeddings == tie
  assert model.config.rope_theta == 5000.0 and (model.config.rope_llama3 is None) == (rope is None)
  pad_NxT = TOKENS_NxT != 0
  ref_NxTxV = _torch_logits(torch_model, TOKENS_NxT, pad_NxT)
  got_NxTxV = np.asarray(_forward(model, jnp.asarray(TOKENS_NxT), jnp.asarray(pad_NxT)))
  # The issue asks for 1e-4; float32 agreement is ~1e-7, and 1e-5 keeps the test sensitive to small RoPE errors.
  np.testing.assert_allclose(got_NxTxV[pad_NxT], ref_NxTxV[pad_NxT], atol=1e-5)
  # The unpadded row alone as well.
  ref_1xTxV = _torch_logits(torch_model, TOKENS_NxT[:1], pad_NxT[:1])
  got_1xTxV = np.asarray(_forward(model, jnp.asarray(TOKENS_NxT[:1]), jnp.ones((1, 7), bool)))
  np.testing.assert_allclose(got_1xTxV, ref_1xTxV, atol=1e-5)


@pytest.mark.torch
def test_sharded_index_loads_sharded_over_8_devices_and_round_trips(tmp_path):
  original = tmp_path / "hf"
  _hf_model("qwen2", original, tie=False, max_shard_size="20KB")
  assert (original / "model.safetensors.index.json").is_file()
  plain = load_hf_checkpoint(original)
  mesh = distributed.make_mesh({"data": 2, "fsdp": 4})
  sharded = load_hf_checkpoint(original, mesh=mesh, scan_layers=True)
  gate = sharded.layers.mlp.gate_proj[...]  # L stacked layers (scan_layers)
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")  # LxFxD, [out, in] as in the file
  assert gate.addressable_shards[0].data.shape == (2, 48, 32 // 4)
  pad_NxT = jnp.asarray(TOKENS_NxT != 0)
  with jax.set_mesh(mesh):
    sharded_logits = _forward(sharded, jnp.asarray(TOKENS_NxT), pad_NxT)
  np.testing.assert_allclose(sharded_logits, _forward(plain, jnp.asarray(TOKENS_NxT), pad_NxT), atol=1e-5)

  # save -> load is the identity on the tensors of the original checkpoint.
  from safetensors.numpy import load_file
  saved = save_hf_checkpoint(sharded, tmp_path / "saved")
  written = load_file(saved / "model.safetensors")
  index = json.loads((original / "model.safetensors.index.json").read_text())["weight_map"]
  originals = {}
  for file in set(index.values()):
    originals.update(load_file(original / file))
  assert set(written) == set(originals)
  for name, array in originals.items():
    np.testing.assert_array_equal(written[name], array, err_msg=name)
  reloaded = load_hf_checkpoint(saved)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(reloaded), nnx.state(plain))


@pytest.mark.torch
def test_tied_checkpoint_with_or_without_lm_head_and_tokenizer_offline(tmp_path):
  _hf_model("qwen3", tmp_path, tie=True)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(tmp_path / "model.safetensors")
  baseline = _forward(load_hf_checkpoint(tmp_path), jnp.asarray(TOKENS_NxT), jnp.asarray(TOKENS_NxT != 0))
  # A stray lm_head.weight in a tied checkpoint is ignored: the head stays the embedding.
  tensors["lm_head.weight"] = np.zeros_like(tensors["model.embed_tokens.weight"])
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with_head = _forward(load_hf_checkpoint(tmp_path), jnp.asarray(TOKENS_NxT), jnp.asarray(TOKENS_NxT != 0))
  np.testing.assert_array_equal(with_head, baseline)

  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  word = Tokenizer(models.WordLevel({"<pad>": 0, "hello": 1, "world": 2}, unk_token="<pad>"))
  word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  PreTrainedTokenizerFast(tokenizer_object=word, pad_token="<pad>").save_pretrained(tmp_path)
  assert load_tokenizer(tmp_path)("hello world")["input_ids"] == [1, 2]


def _write_tiny_checkpoint(folder: pathlib.Path, *, model_type="llama", drop=None, reshape=None, num_layers=1):
  """A small random checkpoint written with numpy only (no torch), optionally broken on purpose."""
  from tsallis_jax.model import ModelConfig, create_model
  cfg = ModelConfig.tiny(arch="llama", qk_norm=False, num_layers=num_layers)
  save_hf_checkpoint(create_model(cfg), folder)
  config = json.loads((folder / "config.json").read_text())
  config["model_type"] = model_type
  (folder / "config.json").write_text(json.dumps(config))
  if drop or reshape:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    if drop:
      del tensors[drop]
    if reshape:
      tensors[reshape] = tensors[reshape][:-1]
    save_file(tensors, str(folder / "model.safetensors"))


def test_loading_errors_name_the_problem(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    load_hf_checkpoint(tmp_path / "nowhere")
  folder = tmp_path / "ok"
  _write_tiny_checkpoint(folder)
  load_hf_checkpoint(folder)  # the unbroken checkpoint loads
  (folder / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_hf_checkpoint(folder)
  _write_tiny_checkpoint(tmp_path / "bad_type", model_type="gpt_neox")
  with pytest.raises(ValueError, match="gpt_neox"):
    load_hf_checkpoint(tmp_path / "bad_type")
  _write_tiny_checkpoint(tmp_path / "missing", drop="model.layers.0.mlp.up_proj.weight")
  with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*missing"):
    load_hf_checkpoint(tmp_path / "missing")
  _write_tiny_checkpoint(tmp_path / "shape", reshape="model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight.*shape \(31, 64\)"):
    load_hf_checkpoint(tmp_path / "shape")
  fewer = tmp_path / "fewer_layers"  # config.json says fewer layers than the weights hold
  _write_tiny_checkpoint(fewer, num_layers=2)
  (fewer / "config.json").write_text(json.dumps({**json.loads((fewer / "config.json").read_text()),
                                                 "num_hidden_layers": 1}))
  with pytest.raises(CheckpointError, match=r"no place.*model\.layers\.1\."):
    load_hf_checkpoint(fewer)
  untied = tmp_path / "untied"
  _write_tiny_checkpoint(untied)
  config = json.loads((untied / "config.json").read_text())
  (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
  with pytest.raises(CheckpointError, match=r"lm_head\.weight.*missing"):
    load_hf_checkpoint(untied)


def test_shared_benchmark_workload_logits(tmp_path):
  if not BENCH_SCRIPT.is_file():
    pytest.skip(f"{BENCH_SCRIPT} is absent")
  spec = importlib.util.spec_from_file_location("make_workload", BENCH_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.build(str(tmp_path))
  model = load_hf_checkpoint(tmp_path)
  assert model.config.qkv_bias and model.config.tie_embeddings
  tokens_1xT = jnp.asarray([[5, 6, 7]])
  logits = _forward(model, tokens_1xT, jnp.ones_like(tokens_1xT, bool))
  np.testing.assert_allclose(np.asarray(logits[0, -1, :5]), BENCH_LOGITS, atol=1e-5)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
  assert n_params == 591_232


@pytest.mark.torch
def test_bfloat16_checkpoint_loads_and_saves_back_bit_exact(tmp_path):
  import torch
  torch_model = _hf_model("qwen3", tmp_path / "f32", tie=True)
  torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  from safetensors.numpy import load_file
  original = load_file(tmp_path / "bf16" / "model.safetensors")
  assert original["model.embed_tokens.weight"].dtype == jnp.bfloat16

  upcast = load_hf_checkpoint(tmp_path / "bf16")  # float32 parameters from bfloat16 tensors
  want = torch_model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(upcast.embed[...]), want)

  model = load_hf_checkpoint(tmp_path / "bf16", dtype="bfloat16", param_dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16
  logits = _forward(model, jnp.asarray(TOKENS_NxT), jnp.asarray(TOKENS_NxT != 0))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  written = load_file(save_hf_checkpoint(model, tmp_path / "out") / "model.safetensors")
  assert set(written) == set(original)
  for name in original:
    np.testing.assert_array_equal(written[name].view(np.uint16), original[name].view(np.uint16), name)
