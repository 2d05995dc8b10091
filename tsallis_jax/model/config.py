"""The frozen model configuration: shapes, architecture switches and the logical-to-mesh sharding rules.

One dataclass covers the three decoder families the loaders read (spec §1.7 trains Qwen3-0.6B):

| family | q/k/v bias | per-head q/k RMSNorm | embeddings |
| --- | --- | --- | --- |
| `qwen3` | no (`attention_bias`) | yes | tied on small sizes |
| `qwen2` | yes | no | tied or untied |
| `llama` | no (`attention_bias`) | no | tied or untied |

Token ids (eos, pad, bos) are the tokenizer's business and are deliberately absent.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

# A logical axis maps to None (replicated), one mesh axis, or a tuple of mesh axes; an axis without a rule is
# replicated. Mesh axes that the current mesh lacks, or whose size does not divide the dimension, are dropped at
# placement time (see `sharding.py`).
ShardingRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The trainer's mesh is data x fsdp (`distributed.make_mesh`, `TrainConfig.mesh_data` / `mesh_fsdp`): rows over both,
# parameters over fsdp along the model width. The other logical axes (vocab, mlp, heads, kv_heads, act_vocab) have
# no rule, so they are replicated; tensor parallelism would map them to a mesh axis of its own.
DEFAULT_SHARDING_RULES: ShardingRules = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("head_dim", None),
  ("norm", None),
  ("act_embed", None),
  ("layers", None),  # the stacked-layer axis of scanned parameters and caches (`scan_layers`) is never sharded
)

#: `ModelConfig.remat` values: what each decoder block keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
_REMAT_BOOLS = {"true": "full", "1": "full", "yes": "full", "false": "none", "0": "none", "no": "none"}


def remat_policy_name(value: "str | bool") -> str:
  """A `REMAT_POLICIES` name from a name or the old bool / its text (True / "true" -> "full", False -> "none")."""
  if isinstance(value, bool):
    return "full" if value else "none"
  text = str(value).strip().lower()
  text = _REMAT_BOOLS.get(text, text)
  if text not in REMAT_POLICIES:
    raise ValueError(f"remat={value!r} is not one of {REMAT_POLICIES} (or true / false for full / none).")
  return text

ARCHITECTURES = ("qwen3", "qwen2", "llama")

#: How attention is computed (`ModelConfig.attention_impl`, see `transformer.attend`): "auto" (the default: "einsum"
#: on CPU, `jax.nn.dot_product_attention` with JAX's choice of implementation elsewhere), "xla" / "cudnn" (that
#: implementation), "einsum" (grouped einsums on the kv-head-major cache layout, the reference).
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")

_HF_MODEL_TYPES = {
  "qwen3": "qwen3",
  "qwen2": "qwen2",
  "llama": "llama",
  "mistral": "llama",  # Mistral without sliding windows is a Llama; the window is checked below.
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and switches of a decoder-only LM (Qwen3, Qwen2 or Llama).

  Attributes:
    vocab_size: V.
    num_layers: L.
    embed_dim: D, the residual width (HF `hidden_size`).
    mlp_dim: F, the SwiGLU hidden width (HF `intermediate_size`).
    num_heads: H query heads.
    num_kv_heads: K key/value heads; H must be a multiple of K (grouped-query attention).
    head_dim: E (Qwen3 sets it explicitly; otherwise D / H).
    arch: "qwen3", "qwen2" or "llama" (used to write HF checkpoints back).
    rope_theta: RoPE base frequency.
    rope_llama3: Llama 3.1-style RoPE frequency scaling as (factor, low_freq_factor, high_freq_factor,
      original_max_position_embeddings), or None for plain RoPE.
    norm_eps: RMSNorm epsilon.
    qkv_bias: q/k/v projections carry a bias (Qwen2).
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
    tie_embeddings: the LM head is the token embedding itself (VxD, [out, in] like every projection).
    dtype: compute dtype name ("float32" or "bfloat16"): activations and matmul operands. Logits, log-softmax,
      attention softmax, RMSNorm and RoPE stay float32 (the precision contract in `tsallis_jax/model/README.md`).
    param_dtype: parameter storage dtype name; keep "float32" for training (the optimizer updates float32 params,
      and each weight is cast to `dtype` where it is used, so gradients arrive in float32).
    remat: what each decoder block keeps for the backward pass (`nnx.remat`): "none" (keep everything, no
      rematerialisation), "full" (keep only the block's input; recompute the rest), "dots_saveable" (keep the
      matmul outputs, recompute the elementwise rest; `jax.checkpoint_policies.dots_saveable`) or
      "dots_with_no_batch_dims_saveable". The old bools are accepted: True -> "full", False -> "none".
    scan_layers: the L decoder blocks' parameters are stacked along a leading "layers" axis and the forward is one
      scan over them (the compiled program holds one block whatever L; the KV cache is stacked LxNxKxSxE too).
      False (the default) keeps one module per layer, looped in Python (unrolled under jit), which measured faster
      at run time on CPU; scan's program is smaller and starts sooner. The trainer's GRPO step on SmolLM2-135M
      (30 layers), side by side at 85ed33f: scan 1.38x slower per step (XLA:CPU copies each layer's weights out of
      the stack per pass; for the rollout inside the step the cause is not settled), first step 12.2 s instead of
      27.3 s cold and 4.1 s instead of 13.8 s re-run from the compile cache (`experiments/benchmarks/README.md`,
      results and compile time). On one H200 (Qwen3-0.6B shapes), with rollouts decoding the layers unrolled
      (`SamplingConfig.unroll_layers`), the scanned step ran as fast as the unrolled one (2.77 s against 2.73 s). Both
      compute the same function; their parameter trees (and so their Orbax checkpoints) differ, their Hugging Face
      files do not.
    attention_query_chunk: if set, attention runs over blocks of this many queries (exact; peak score memory
      N x H x chunk x S instead of N x H x T x S), for long teacher-forced sequences.
    attention_impl: one of `ATTENTION_IMPLS`. "cudnn" (cuDNN flash attention) needs a GPU backend, dtype
      bfloat16 or float16 and head_dim a multiple of 8 up to 256 (128 before Hopper); a bad combination raises
      ValueError here or at the first call.
    sharding_rules: (logical axis, mesh axes) pairs; see `DEFAULT_SHARDING_RULES`.
  """
  vocab_size: int
  num_layers: int
  embed_dim: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  arch: str = "qwen3"
  rope_theta: float = 1_000_000.0
  rope_llama3: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False  # unrolled: faster at run time on CPU (experiments/benchmarks/README.md)
  attention_query_chunk: int | None = None
  attention_impl: str = "auto"
  sharding_rules: ShardingRules = DEFAULT_SHARDING_RULES

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policy_name(self.remat))
    positive = ("vocab_size", "num_layers", "embed_dim", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; grouped-query "
        "attention needs each kv head to serve the same number of query heads.")
    if self.attention_query_chunk is not None and self.attention_query_chunk <= 0:
      raise ValueError(f"attention_query_chunk={self.attention_query_chunk} must be positive or None.")
    if self.rope_llama3 is not None and len(self.rope_llama3) != 4:
      raise ValueError("rope_llama3 is (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
    if self.arch not in ARCHITECTURES:
      raise ValueError(f"arch={self.arch!r} is not one of {ARCHITECTURES}.")
    if self.qkv_bias != (self.arch == "qwen2"):
      raise ValueError(f"qkv_bias={self.qkv_bias} does not match arch={self.arch!r}: only qwen2 has q/k/v biases.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; use 'float32', 'bfloat16' or 'float16'.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}.")
    if self.attention_impl == "cudnn":
      if self.dtype == "float32":
        raise ValueError("attention_impl='cudnn' needs dtype='bfloat16' or 'float16' (cuDNN flash attention has no "
                         "float32 kernel); set dtype='bfloat16', or attention_impl='xla' for float32 compute.")
      if self.head_dim % 8 or self.head_dim > 256:
        raise ValueError(f"attention_impl='cudnn' needs head_dim a multiple of 8 and at most 256, got "
                         f"{self.head_dim}; use attention_impl='xla'.")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------------------------------------------- presets

  @classmethod
  def tiny(cls, **changes: Any) -> "ModelConfig":
    """A Qwen3-shaped model small enough for CPU tests (GQA with 2 query heads per kv head, tied embeddings)."""
    base = cls(vocab_size=128, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4, num_kv_heads=2,
               head_dim=16, arch="qwen3", rope_theta=10_000.0, norm_eps=1e-6, qkv_bias=False, qk_norm=True,
               tie_embeddings=True)
    return base.replace(**changes)

  @classmethod
  def qwen3_0_6b(cls, **changes: Any) -> "ModelConfig":
    """Qwen/Qwen3-0.6B (the paper's model, spec §1.7): 28 layers, D 1024, 16/8 heads of 128, tied, theta 1e6."""
    base = cls(vocab_size=151_936, num_layers=28, embed_dim=1024, mlp_dim=3072, num_heads=16, num_kv_heads=8,
               head_dim=128, arch="qwen3", rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=False, qk_norm=True,
               tie_embeddings=True)
    return base.replace(**changes)

  @classmethod
  def smollm2_135m(cls, **changes: Any) -> "ModelConfig":
    """HuggingFaceTB/SmolLM2-135M(-Instruct): Llama, 30 layers, D 576, 9/3 heads of 64, tied, theta 1e5."""
    base = cls(vocab_size=49_152, num_layers=30, embed_dim=576, mlp_dim=1536, num_heads=9, num_kv_heads=3,
               head_dim=64, arch="llama", rope_theta=100_000.0, norm_eps=1e-5, qkv_bias=False, qk_norm=False,
               tie_embeddings=True)
    return base.replace(**changes)

  # ---------------------------------------------------------------------------------------------------- HF configs

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **changes: Any) -> "ModelConfig":
    """Builds the config from a Hugging Face `config.json` dict (Qwen3, Qwen2, Llama; Mistral without windows).

    Raises:
      ValueError: unknown `model_type`, a missing field, or a feature this model does not implement (RoPE scaling
        other than Llama 3.1's, sliding-window attention, an MLP activation other than SiLU).
    """
    model_type = hf.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
      raise ValueError(
        f"Unknown model_type {model_type!r} in config.json; supported: {sorted(_HF_MODEL_TYPES)}. Convert the "
        "checkpoint to one of these families or add the architecture to tsallis_jax/model/config.py.")
    arch = _HF_MODEL_TYPES[model_type]

    def need(key: str) -> Any:
      if key not in hf:
        raise ValueError(f"config.json for model_type {model_type!r} lacks the field {key!r}.")
      return hf[key]

    rope_llama3 = None
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4.x / 5.x spellings
      scaling = hf.get(key) or {}
      rope_type = scaling.get("rope_type", scaling.get("type", "default"))
      if rope_type == "llama3":
        fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(f not in scaling for f in fields):
          raise ValueError(f"{key} of type 'llama3' needs the fields {fields}; got {sorted(scaling)}.")
        rope_llama3 = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
      elif rope_type != "default":
        raise ValueError(f"{key} of type {rope_type!r} is not implemented; only plain and 'llama3' RoPE are.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act={act!r} is not implemented; the SwiGLU MLP here uses SiLU.")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
      raise ValueError("Sliding-window attention is not implemented; set use_sliding_window=false.")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=true is not implemented; the SwiGLU projections here have no bias.")

    num_heads = need("num_attention_heads")
    embed_dim = need("hidden_size")
    head_dim = hf.get("head_dim") or embed_dim // num_heads
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10_000.0))
    if arch != "qwen2" and hf.get("attention_bias"):
      raise ValueError(f"attention_bias=true for model_type {model_type!r} (biases on q/k/v and o) is not "
                       "implemented; only Qwen2's q/k/v biases are.")
    qkv_bias = arch == "qwen2"
    kwargs = dict(
      vocab_size=need("vocab_size"), num_layers=need("num_hidden_layers"), embed_dim=embed_dim,
      mlp_dim=need("intermediate_size"), num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim, arch=arch,
      rope_theta=float(rope_theta), rope_llama3=rope_llama3, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=qkv_bias, qk_norm=arch == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    kwargs.update(changes)
    return cls(**kwargs)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that `from_hf_config` reads back to this config (up to dtype/remat/rules)."""
    hf: dict[str, Any] = {
      "model_type": self.arch,
      "architectures": [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "llama": "LlamaForCausalLM"}[self.arch]],
      "vocab_size": self.vocab_size, "num_hidden_layers": self.num_layers, "hidden_size": self.embed_dim,
      "intermediate_size": self.mlp_dim, "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta,
      "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
      "dtype": self.param_dtype,  # transformers 5 reads `dtype`; `torch_dtype` is its deprecated spelling
    }
    if self.arch != "qwen2":
      hf["attention_bias"] = False
    if self.rope_llama3 is not None:
      factor, low, high, original = self.rope_llama3
      hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    return hf
