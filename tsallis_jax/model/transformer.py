"""Decoder-only LM in Flax NNX covering Qwen3, Qwen2 and Llama (spec §1.7: the paper trains Qwen3-0.6B).

Pre-RMSNorm blocks with grouped-query attention (optional per-head q/k RMSNorm, optional q/k/v biases), rotary
embeddings in the split-halves (rotate-half) convention of Hugging Face, a SwiGLU MLP, and a tied or untied LM head.
Attention runs as grouped einsums or through `jax.nn.dot_product_attention` (XLA or cuDNN), per
`cfg.attention_impl` (`attend`). Precision: activations in `cfg.dtype` from float32 parameters; RMSNorm, RoPE, the
attention softmax and the logits in float32 (the contract in `tsallis_jax/model/README.md`).

Weights are stored [out, in] as in Hugging Face (the output axis split per head), each with `logical_axes` metadata
for sharding. Every projection is one `linear` call, which multiplies decode-sized batches with the weight as the
left operand on CPU (the layout XLA CPU streams fastest) and orders the weight gradient's transposes for wide
projections at training batch sizes on CPU:

| parameter | shape | logical axes |
| --- | --- | --- |
| `embed` | VxD | vocab, embed |
| `q_proj` / `k_proj` / `v_proj` | HxExD / KxExD | heads / kv_heads, head_dim, embed |
| `o_proj` | DxHxE | embed, heads, head_dim |
| `gate_proj`, `up_proj` / `down_proj` | FxD / DxF | mlp, embed / embed, mlp |
| `lm_head` (untied only) | VxD | vocab, embed |

Layers come in two forms computing the same function (`cfg.scan_layers`). Scanned (True): one `Block` whose
parameters carry a leading L axis (logical axis "layers", never sharded), e.g. `layers.attn.q_proj` LxHxExD,
initialised by one `nnx.vmap` over L keys (layer l equals the unrolled layer l bit for bit); the forward is one
`jax.lax.scan` over them, so the compiled program holds one block whatever L, and the KV cache is stacked LxNxKxSxE
and carried through the scan. Unrolled (False, the default): an `nnx.List` of L blocks looped in Python (unrolled
under jit; one subtree `layers.{l}` per layer, per-layer cache buffers). On CPU the unrolled form runs faster and
compiles the train step no slower up to 30 layers (`python -m experiments.benchmarks.compile_depth`); the scan is
for deep models on accelerators, where compile time grows with the unrolled program. The Hugging Face files are per
layer in both forms (`hf_io` stacks and unstacks); Orbax checkpoints hold the tree of the form that wrote them.
`cfg.remat` picks what each block keeps for the backward pass: "none", "full", "dots_saveable" (or
"dots_with_no_batch_dims_saveable"), as a `jax.checkpoint` policy around each block.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tsallis_jax.model.cache import CACHE_LOGICAL_AXES, KVCache, PromptGroupMask
from tsallis_jax.model.config import ModelConfig
from tsallis_jax.model.sharding import constrain, param_shardings

_INIT_STD = 0.02


def _param(key: jax.Array | None, shape: Sequence[int], axes: tuple[str, ...], dtype, init: str = "normal"
           ) -> nnx.Param:
  if init == "normal":
    value = _INIT_STD * jax.random.normal(key, tuple(shape), jnp.float32)
  elif init == "ones":
    value = jnp.ones(tuple(shape), jnp.float32)
  else:
    value = jnp.zeros(tuple(shape), jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


#: Token rows (product of the leading axes) up to which `linear` takes the weight as the matmul's left operand on CPU.
WEIGHT_LEFT_MAX_ROWS = 64


def linear(x_NxTxD: jax.Array, w_FxD: jax.Array, *, preferred_element_type=None) -> jax.Array:
  """x @ w.T over x's last axis, for a weight stored [out, in] (Hugging Face's layout); returns NxTxF.

  A decode step multiplies a few token rows (the sampler's batch) by every weight. For 2 to `WEIGHT_LEFT_MAX_ROWS`
  rows on CPU the product is computed as w @ x.T with the activations transposed explicitly (optimisation barriers
  keep XLA from folding the transposes back into the dot, which selects a slower kernel): XLA CPU's GEMM streams the
  weights faster with the large dimension on the left, 1.25x for SmolLM2's MLP and 1.42x for its LM head at 16 rows
  (`python -m experiments.benchmarks.decode_gemm`). One row (a matrix-vector product, already at memory bandwidth),
  more rows (compute-bound either way) and other backends (which pick their own layouts) take the plain einsum.
  Both give the same product up to float32 summation order. Above `WEIGHT_LEFT_MAX_ROWS` rows on CPU (training and
  scoring batches), projections whose output is wider than their input take the einsum with a hand-written backward
  pass that orders the weight gradient's transposes (`_linear_input_transposed_grad`).
  """
  *lead, d = x_NxTxD.shape
  rows = int(np.prod(lead))
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and 2 <= rows <= WEIGHT_LEFT_MAX_ROWS:
    x_DxM = jax.lax.optimization_barrier(x_NxTxD.reshape(rows, d).T)
    out_FxM = jnp.matmul(w_FxD, x_DxM, preferred_element_type=preferred_element_type)
    return jax.lax.optimization_barrier(out_FxM).T.reshape(*lead, w_FxD.shape[0])
  if on_cpu and rows > WEIGHT_LEFT_MAX_ROWS and _transpose_input_for_grad(rows, d, w_FxD.shape[0]):
    return _linear_input_transposed_grad(x_NxTxD, w_FxD, preferred_element_type)
  return jnp.einsum("...d,fd->...f", x_NxTxD, w_FxD, preferred_element_type=preferred_element_type)


def _transpose_input_for_grad(rows: int, d: int, f: int) -> bool:
  """Whether the weight gradient dW = dy^T x (FxD, over M token rows) is cheaper computed as (x^T dy)^T: that
  transposes the input x (M x D) and the small FxD result instead of the output gradient dy (M x F), so it pays when
  M * F > D * (M + F), e.g. a SwiGLU MLP's gate and up projections (F = 4 D) at training batch sizes."""
  return rows * f > d * (rows + f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_input_transposed_grad(x_NxTxD, w_FxD, preferred_element_type):
  """`linear`'s einsum with a backward pass that computes dW = (x^T dy)^T (`_transpose_input_for_grad`), on CPU.

  Differentiating the einsum, XLA CPU transposes the output gradient dy to MxF -> FxM for its GEMM and fuses the
  elementwise work that produced dy (for the gate projection, the SwiGLU derivative's four inputs) into that
  transposing copy, which then reads four tensors in strided order: 18.6 ms for the `tiny` workload's 3072 x 512
  gate gradient, against 0.9 ms for a plain copy. Transposing x instead (behind optimisation barriers, so XLA keeps
  the order) leaves dy in its natural layout: the `tiny` benchmark's GRPO step takes 0.150 s against 0.191 s with
  autodiff's backward (`python -m experiments.benchmarks.cpu_paths`, `results/cpu_paths.md`). No projection of
  SmolLM2-135M at the `smollm2` benchmark's shapes meets the rule, so that step is unchanged. Same products; the
  gradients equal autodiff's up to summation order."""
  return jnp.einsum("...d,fd->...f", x_NxTxD, w_FxD, preferred_element_type=preferred_element_type)


def _linear_input_transposed_grad_fwd(x_NxTxD, w_FxD, preferred_element_type):
  return _linear_input_transposed_grad(x_NxTxD, w_FxD, preferred_element_type), (x_NxTxD, w_FxD)


def _linear_input_transposed_grad_bwd(preferred_element_type, residuals, dy_NxTxF):
  del preferred_element_type
  x_NxTxD, w_FxD = residuals
  d, f = x_NxTxD.shape[-1], w_FxD.shape[0]
  dy_MxF = dy_NxTxF.reshape(-1, f)
  dx_MxD = jnp.matmul(dy_MxF, w_FxD.astype(dy_MxF.dtype))
  x_DxM = jax.lax.optimization_barrier(x_NxTxD.reshape(-1, d).T)
  dw_DxF = jnp.matmul(x_DxM.astype(dy_MxF.dtype), dy_MxF)
  return (dx_MxD.astype(x_NxTxD.dtype).reshape(x_NxTxD.shape),
          jax.lax.optimization_barrier(dw_DxF).T.astype(w_FxD.dtype))


_linear_input_transposed_grad.defvjp(_linear_input_transposed_grad_fwd, _linear_input_transposed_grad_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """weight * x / rms(x) over the last axis, normalised in float32 and cast back to x's dtype (as HF does)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  weight = weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + weight.shape)
  return weight * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """The E/2 rotary inverse frequencies, with Llama 3.1's scaling when `cfg.rope_llama3` is set (as in HF)."""
  e = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
  if cfg.rope_llama3 is None:
    return inv_freq.astype(np.float32)
  factor, low_freq_factor, high_freq_factor, original = cfg.rope_llama3
  wavelen = 2 * np.pi / inv_freq
  low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x_NxTxHxE: jax.Array, positions_NxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, split-halves convention: x * cos + rotate_half(x) * sin, angles in float32."""
  e = x_NxTxHxE.shape[-1]
  angle_NxTxE2 = positions_NxT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
  cos_NxTx1xE = jnp.concatenate([jnp.cos(angle_NxTxE2)] * 2, axis=-1)[:, :, None, :]
  sin_NxTx1xE = jnp.concatenate([jnp.sin(angle_NxTxE2)] * 2, axis=-1)[:, :, None, :]
  x32 = x_NxTxHxE.astype(jnp.float32)
  x1, x2 = x32[..., : e // 2], x32[..., e // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos_NxTx1xE + rotated * sin_NxTx1xE).astype(x_NxTxHxE.dtype)


def attend_dot_product(q_NxTxHxE: jax.Array, k_NxKxSxE: jax.Array, v_NxKxSxE: jax.Array, attn_mask_NxTxS: jax.Array,
                       *, impl: str) -> jax.Array:
  """`attend` through `jax.nn.dot_product_attention`: impl "auto" (JAX's choice, XLA today), "xla" or "cudnn".

  GQA is native (K kv heads in BTNH layout); the boolean mask is broadcast over heads. The XLA implementation fills
  masked scores with -0.7 * max(float32) and takes the softmax in float32, so a fully masked row (a left-padding
  query) gets uniform weights and stays finite, as in the einsum path; cuDNN turns the mask into an additive bias of
  the same value.
  """
  if impl not in ("auto", "xla", "cudnn"):
    raise ValueError(f"attend_dot_product: impl must be 'auto', 'xla' or 'cudnn', got {impl!r}.")
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs a CUDA GPU backend, but JAX's default backend is "
                     f"{jax.default_backend()!r}; use attention_impl='auto' or 'xla' here.")
  # BTNH layout: keys and values seq-major, a transpose of the kv-head-major cache (without a cache the model's
  # transpose to kv-head major and this one cancel).
  k_NxSxKxE = k_NxKxSxE.transpose(0, 2, 1, 3)
  v_NxSxKxE = v_NxKxSxE.transpose(0, 2, 1, 3)
  mask_Nx1xTxS = attn_mask_NxTxS.astype(bool)[:, None]
  try:
    return jax.nn.dot_product_attention(q_NxTxHxE, k_NxSxKxE, v_NxSxKxE, mask=mask_Nx1xTxS,
                                        implementation=None if impl == "auto" else impl)
  except (NotImplementedError, RuntimeError) as err:
    if impl != "cudnn":
      raise
    raise ValueError(f"attention_impl='cudnn' cannot run this attention (q {q_NxTxHxE.shape} {q_NxTxHxE.dtype}, "
                     f"kv length {k_NxKxSxE.shape[2]}): {err}. Use attention_impl='auto' for this model.") from err


def attend(q_NxTxHxE: jax.Array, k_NxKxSxE: jax.Array, v_NxKxSxE: jax.Array, attn_mask_NxTxS: jax.Array,
           *, impl: str = "auto") -> jax.Array:
  """Softmax attention with grouped kv heads; scores and softmax in float32, fully masked rows stay finite.

  `impl` is `ModelConfig.attention_impl`. "einsum" runs two grouped einsums on the kv-head-major layout of the KV
  cache, batching over (N, K) without copying keys or values; it is the reference the other paths are tested
  against (`tests/test_attention.py`). "xla" / "cudnn" go through `attend_dot_product`
  (`jax.nn.dot_product_attention`). "auto" is the einsum path on CPU and `jax.nn.dot_product_attention` with JAX's
  choice of implementation elsewhere.

  Why einsum on CPU (a CPU choice, not a CPU-only path: the einsum path is the reference on every backend): side by
  side on XLA CPU at SmolLM2-135M's widths (`python -m experiments.benchmarks.attention_impl`, quietest run) the two
  tie in the model, XLA / einsum = 1.01x for the forward + backward of 8 x 48 tokens and 1.02x for a 16-row decode
  step (1.13x for the decode attention alone), and einsum keeps every committed CPU result bit-identical (the
  sampler's saved reference rollouts, the demo's numbers), which the XLA path's other summation order does not.
  """
  if impl == "auto" and jax.default_backend() == "cpu":
    impl = "einsum"
  if impl != "einsum":
    return attend_dot_product(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, attn_mask_NxTxS, impl=impl)
  n, t, h, e = q_NxTxHxE.shape
  kv = k_NxKxSxE.shape[1]
  # J = H / K query heads share one kv head.
  q_NxTxKxJxE = q_NxTxHxE.reshape(n, t, kv, h // kv, e)
  scores_NxKxJxTxS = jnp.einsum("ntkje,nkse->nkjts", q_NxTxKxJxE, k_NxKxSxE,
                                preferred_element_type=jnp.float32) * (e ** -0.5)
  mask_Nx1x1xTxS = attn_mask_NxTxS[:, None, None, :, :]
  scores_NxKxJxTxS = jnp.where(mask_Nx1x1xTxS, scores_NxKxJxTxS, jnp.finfo(jnp.float32).min)
  probs_NxKxJxTxS = jax.nn.softmax(scores_NxKxJxTxS, axis=-1).astype(q_NxTxHxE.dtype)
  out_NxTxKxJxE = jnp.einsum("nkjts,nkse->ntkje", probs_NxKxJxTxS, v_NxKxSxE)
  return out_NxTxKxJxE.reshape(n, t, h, e)



def attend_in_query_chunks(q_NxTxHxE: jax.Array, k_NxKxSxE: jax.Array, v_NxKxSxE: jax.Array,
                           attn_mask_NxTxS: jax.Array, chunk: int, *, impl: str = "auto") -> jax.Array:
  """`attend` over Z blocks of W = `chunk` queries (`lax.map`, rematerialised): exact, with peak score memory
  N x H x W x S instead of N x H x T x S, for long sequences (the paper's rationales run to 4k tokens)."""
  n, t, h, e = q_NxTxHxE.shape
  blocks = -(-t // chunk)
  pad = blocks * chunk - t  # the queries are padded to Z*W
  q_ZxNxWxHxE = (jnp.pad(q_NxTxHxE, ((0, 0), (0, pad), (0, 0), (0, 0)))
                 .reshape(n, blocks, chunk, h, e).transpose(1, 0, 2, 3, 4))
  mask_ZxNxWxS = (jnp.pad(attn_mask_NxTxS, ((0, 0), (0, pad), (0, 0)))
                  .reshape(n, blocks, chunk, -1).transpose(1, 0, 2, 3))
  block_fn = jax.checkpoint(lambda q, m: attend(q, k_NxKxSxE, v_NxKxSxE, m, impl=impl))
  out_ZxNxWxHxE = jax.lax.map(lambda xs: block_fn(*xs), (q_ZxNxWxHxE, mask_ZxNxWxS))
  return out_ZxNxWxHxE.transpose(1, 0, 2, 3, 4).reshape(n, blocks * chunk, h, e)[:, :t]


def attend_prompt_groups(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array, mask: PromptGroupMask,
                         attend_fn, rules=None) -> jax.Array:
  """Attention of B packed rows [prompt b (P tokens), completions b*G .. b*G + G-1 (T tokens each)], L = P + G*T
  (`PromptGroupMask`): the prompt attends over itself, completion n = b*G + g over [prompt b, itself]; BxLxHxE out.

  The completions' queries, keys and values are a free reshape of the packed rows (N = B*G rows of T); the prompt's
  keys and values are repeated G times here, one layer at a time (`rules` keeps the repeat batch-sharded), so the
  work is the unpacked sequences' (N*T*(P+T) + B*P*P scores) and the group's completions never see one another.
  `attend_fn(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, mask_NxTxS)` is the layer's attention (`Attention._attend`).
  """
  b, p, g, t = mask.shape_BxPxGxT
  _, l, h, e = q_BxLxHxE.shape
  kv = k_BxLxKxE.shape[2]
  if l != p + g * t:
    raise ValueError(f"attend_prompt_groups: packed rows of {l} tokens, but the mask describes P + G*T = "
                     f"{p} + {g}*{t} = {p + g * t}.")
  kv_heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  NxTxKxE -> NxKxTxE
  k_BxKxPxE, v_BxKxPxE = kv_heads_major(k_BxLxKxE[:, :p]), kv_heads_major(v_BxLxKxE[:, :p])
  prompt_BxPxHxE = attend_fn(q_BxLxHxE[:, :p], k_BxKxPxE, v_BxKxPxE, mask.prompt_BxPxP)

  def repeat(x_BxKxPxE):
    x_NxKxPxE = jnp.repeat(x_BxKxPxE, g, axis=0)
    return x_NxKxPxE if rules is None else constrain(x_NxKxPxE, CACHE_LOGICAL_AXES, rules)
  completions = lambda x_BxLxZxE, z: x_BxLxZxE[:, p:].reshape(b * g, t, z, e)  # noqa: E731  N = B*G rows of T
  k_NxKxSxE = jnp.concatenate([repeat(k_BxKxPxE), kv_heads_major(completions(k_BxLxKxE, kv))], axis=2)
  v_NxKxSxE = jnp.concatenate([repeat(v_BxKxPxE), kv_heads_major(completions(v_BxLxKxE, kv))], axis=2)
  comp_NxTxHxE = attend_fn(completions(q_BxLxHxE, h), k_NxKxSxE, v_NxKxSxE, mask.comp_NxTxS)
  return jnp.concatenate([prompt_BxPxHxE, comp_NxTxHxE.reshape(b, g * t, h, e)], axis=1)


def write_layer_cache(layer_cache: tuple, k_NxKxTxE: jax.Array, v_NxKxTxE: jax.Array
                      ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
  """Writes one layer's T new keys/values at slot `index`; returns (k_NxKxSxE, v_NxKxSxE, new buffers).

  `layer_cache` is `(k_NxKxSxE, v_NxKxSxE, index)` for one layer's own buffers (unrolled layers), or
  `(k_LxNxKxSxE, v_LxNxKxSxE, index, layer)` for the stacked buffers of all layers carried through the scan: the
  write goes to layer `layer` in place (`dynamic_update_slice` on the carry) and that layer's slab is read back.
  """
  if len(layer_cache) == 3:
    k_buf, v_buf, index = layer_cache
    k_NxKxSxE = jax.lax.dynamic_update_slice(k_buf, k_NxKxTxE.astype(k_buf.dtype), (0, 0, index, 0))
    v_NxKxSxE = jax.lax.dynamic_update_slice(v_buf, v_NxKxTxE.astype(v_buf.dtype), (0, 0, index, 0))
    return k_NxKxSxE, v_NxKxSxE, (k_NxKxSxE, v_NxKxSxE)
  k_LxNxKxSxE, v_LxNxKxSxE, index, layer = layer_cache
  k_LxNxKxSxE = jax.lax.dynamic_update_slice(k_LxNxKxSxE, k_NxKxTxE[None].astype(k_LxNxKxSxE.dtype),
                                             (layer, 0, 0, index, 0))
  v_LxNxKxSxE = jax.lax.dynamic_update_slice(v_LxNxKxSxE, v_NxKxTxE[None].astype(v_LxNxKxSxE.dtype),
                                             (layer, 0, 0, index, 0))
  k_NxKxSxE = jax.lax.dynamic_index_in_dim(k_LxNxKxSxE, layer, axis=0, keepdims=False)
  v_NxKxSxE = jax.lax.dynamic_index_in_dim(v_LxNxKxSxE, layer, axis=0, keepdims=False)
  return k_NxKxSxE, v_NxKxSxE, (k_LxNxKxSxE, v_LxNxKxSxE)


class Attention(nnx.Module):
  """Grouped-query attention; query head h reads kv head h // (H / K), without repeating k or v."""

  def __init__(self, cfg: ModelConfig, *, key: jax.Array):
    self.cfg = cfg
    d, h, k, e, pd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
    q_key, k_key, v_key, o_key = jax.random.split(key, 4)
    self.q_proj = _param(q_key, (h, e, d), ("heads", "head_dim", "embed"), pd)
    self.k_proj = _param(k_key, (k, e, d), ("kv_heads", "head_dim", "embed"), pd)
    self.v_proj = _param(v_key, (k, e, d), ("kv_heads", "head_dim", "embed"), pd)
    self.o_proj = _param(o_key, (d, h, e), ("embed", "heads", "head_dim"), pd)
    if cfg.qkv_bias:
      self.q_bias = _param(None, (h, e), ("heads", "head_dim"), pd, "zeros")
      self.k_bias = _param(None, (k, e), ("kv_heads", "head_dim"), pd, "zeros")
      self.v_bias = _param(None, (k, e), ("kv_heads", "head_dim"), pd, "zeros")
    if cfg.qk_norm:
      self.q_norm = _param(None, (e,), ("norm",), pd, "ones")
      self.k_norm = _param(None, (e,), ("norm",), pd, "ones")

  def __call__(self, x_NxTxD, positions_NxT, attn_mask_NxTxS, layer_cache):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    n, t, d = x_NxTxD.shape

    def project(w_HxExD):  # one [heads*E, D] matrix (a free reshape), so `linear` sees a plain [out, in] weight
      heads, e, _ = w_HxExD.shape
      return linear(x_NxTxD, w_HxExD.astype(dt).reshape(heads * e, d)).reshape(n, t, heads, e)
    q_NxTxHxE = project(self.q_proj[...])
    k_NxTxKxE = project(self.k_proj[...])
    v_NxTxKxE = project(self.v_proj[...])
    if cfg.qkv_bias:
      q_NxTxHxE = q_NxTxHxE + self.q_bias[...].astype(dt)[None, None]
      k_NxTxKxE = k_NxTxKxE + self.k_bias[...].astype(dt)[None, None]
      v_NxTxKxE = v_NxTxKxE + self.v_bias[...].astype(dt)[None, None]
    if cfg.qk_norm:
      q_NxTxHxE = rms_norm(q_NxTxHxE, self.q_norm[...], cfg.norm_eps)
      k_NxTxKxE = rms_norm(k_NxTxKxE, self.k_norm[...], cfg.norm_eps)
    inv_freq = rope_inv_freq(cfg)
    q_NxTxHxE = rope(q_NxTxHxE, positions_NxT, inv_freq)
    k_NxTxKxE = rope(k_NxTxKxE, positions_NxT, inv_freq)
    q_NxTxHxE = constrain(q_NxTxHxE, ("batch", "length", "heads", "head_dim"), cfg.sharding_rules)

    if isinstance(attn_mask_NxTxS, PromptGroupMask):
      out_NxTxHxE = attend_prompt_groups(q_NxTxHxE, k_NxTxKxE, v_NxTxKxE, attn_mask_NxTxS, self._attend,
                                         cfg.sharding_rules)
      return self._output(out_NxTxHxE), None
    k_NxKxTxE = k_NxTxKxE.transpose(0, 2, 1, 3)
    v_NxKxTxE = v_NxTxKxE.transpose(0, 2, 1, 3)
    if layer_cache is None:
      k_NxKxSxE, v_NxKxSxE, new_layer_cache = k_NxKxTxE, v_NxKxTxE, None
    else:
      k_NxKxSxE, v_NxKxSxE, new_layer_cache = write_layer_cache(layer_cache, k_NxKxTxE, v_NxKxTxE)
      k_NxKxSxE, v_NxKxSxE = k_NxKxSxE.astype(dt), v_NxKxSxE.astype(dt)

    out_NxTxHxE = self._attend(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, attn_mask_NxTxS)
    return self._output(out_NxTxHxE), new_layer_cache

  def _attend(self, q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, attn_mask_NxTxS):
    """`attend`, in blocks of `cfg.attention_query_chunk` queries when T is longer."""
    chunk, impl = self.cfg.attention_query_chunk, self.cfg.attention_impl
    if chunk is None or q_NxTxHxE.shape[1] <= chunk:
      return attend(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, attn_mask_NxTxS, impl=impl)
    return attend_in_query_chunks(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, attn_mask_NxTxS, chunk, impl=impl)

  def _output(self, out_NxTxHxE):
    """The output projection, NxTxHxE -> NxTxD."""
    # One contracting axis of H*E (a free reshape of both operands): contracting (h, e) as two axes let XLA CPU
    # pick an (e, h) order and copy o_proj transposed at every decode step.
    n, t, h, e = out_NxTxHxE.shape
    o_proj_DxF = self.o_proj[...].astype(self.cfg.compute_dtype).reshape(-1, h * e)
    return linear(out_NxTxHxE.reshape(n, t, h * e), o_proj_DxF)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, key: jax.Array):
    self.cfg = cfg
    d, f, pd = cfg.embed_dim, cfg.mlp_dim, cfg.weight_dtype
    gate_key, up_key, down_key = jax.random.split(key, 3)
    self.gate_proj = _param(gate_key, (f, d), ("mlp", "embed"), pd)
    self.up_proj = _param(up_key, (f, d), ("mlp", "embed"), pd)
    self.down_proj = _param(down_key, (d, f), ("embed", "mlp"), pd)

  def __call__(self, x_NxTxD):
    dt = self.cfg.compute_dtype
    gate_NxTxF = linear(x_NxTxD, self.gate_proj[...].astype(dt))
    up_NxTxF = linear(x_NxTxD, self.up_proj[...].astype(dt))
    hidden_NxTxF = constrain(jax.nn.silu(gate_NxTxF) * up_NxTxF, ("batch", "length", "mlp"), self.cfg.sharding_rules)
    return linear(hidden_NxTxF, self.down_proj[...].astype(dt))


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, key: jax.Array):
    self.cfg = cfg
    attn_key, mlp_key = jax.random.split(key)
    self.attn_norm = _param(None, (cfg.embed_dim,), ("norm",), cfg.weight_dtype, "ones")
    self.attn = Attention(cfg, key=attn_key)
    self.mlp_norm = _param(None, (cfg.embed_dim,), ("norm",), cfg.weight_dtype, "ones")
    self.mlp = MLP(cfg, key=mlp_key)

  def __call__(self, x_NxTxD, positions_NxT, attn_mask_NxTxS, layer_cache):
    eps = self.cfg.norm_eps
    attn_NxTxD, new_layer_cache = self.attn(rms_norm(x_NxTxD, self.attn_norm[...], eps), positions_NxT,
                                            attn_mask_NxTxS, layer_cache)
    x_NxTxD = x_NxTxD + attn_NxTxD
    x_NxTxD = x_NxTxD + self.mlp(rms_norm(x_NxTxD, self.mlp_norm[...], eps))
    x_NxTxD = constrain(x_NxTxD, ("batch", "length", "act_embed"), self.cfg.sharding_rules)
    return x_NxTxD, new_layer_cache


def stacked_blocks(cfg: ModelConfig, keys_L: jax.Array) -> Block:
  """L blocks as one `Block` whose parameters carry a leading L axis (logical axis "layers"), built by one
  `nnx.vmap` of the block's initialiser over the L keys: layer l's values equal `Block(cfg, key=keys_L[l])`'s."""
  blocks = nnx.vmap(lambda key: Block(cfg, key=key), in_axes=0, out_axes=0)(keys_L)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Variable):
      var.set_metadata("logical_axes", ("layers", *var.get_metadata()["logical_axes"]))
  return blocks


def remat_block(fn, policy: str, *, prevent_cse: bool, checkpoint=nnx.remat):
  """`fn` (a block's call) rematerialised by `ModelConfig.remat`'s policy; `fn` itself for "none".

  `checkpoint` is `nnx.remat` for a call that takes the `Block` module (the unrolled loop), `jax.checkpoint` for a
  pure function of arrays (the scan's step)."""
  if policy == "none":
    return fn
  policies = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
              "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  return checkpoint(fn, policy=policies[policy], prevent_cse=prevent_cse)


def _check_inputs(cfg: ModelConfig, tokens_NxT, positions_NxT, attn_mask_NxTxS, cache, cache_index):
  if tokens_NxT.ndim != 2:
    raise ValueError(f"tokens must be rank 2 (rows x tokens), got shape {tokens_NxT.shape}.")
  n, t = tokens_NxT.shape
  if positions_NxT.shape != (n, t):
    raise ValueError(f"positions have shape {positions_NxT.shape}; expected {(n, t)} like the tokens.")
  if isinstance(attn_mask_NxTxS, PromptGroupMask):
    prompt_shape, comp_shape = attn_mask_NxTxS.prompt_BxPxP.shape, attn_mask_NxTxS.comp_NxTxS.shape
    b, p, g, t_comp = attn_mask_NxTxS.shape_BxPxGxT
    if (cache is not None or prompt_shape != (b, p, p) or comp_shape != (b * g, t_comp, p + t_comp)
        or (n, t) != (b, p + g * t_comp)):
      raise ValueError(f"A PromptGroupMask of prompt mask {prompt_shape} (B x P x P) and completion mask "
                       f"{comp_shape} (B*G x T x P+T) needs tokens of shape (B, P + G*T) = {(b, p + g * t_comp)} "
                       f"and no cache; got tokens {(n, t)}{' and a cache' if cache is not None else ''}.")
    return
  s = t if cache is None else cache.max_len
  if attn_mask_NxTxS.shape != (n, t, s):
    where = "T (no cache)" if cache is None else "the cache's max_len"
    raise ValueError(f"attn_mask has shape {attn_mask_NxTxS.shape}; expected {(n, t, s)} with S = {where}.")
  if cache is not None:
    if cache_index is None:
      raise ValueError("A cache was given without cache_index; pass the slot where the new tokens go (0 for prefill).")
    if cache.batch_size != n:
      raise ValueError(f"The cache holds {cache.batch_size} rows but the tokens have {n}.")
    if cache.stacked != cfg.scan_layers:
      layouts = {True: "stacked LxNxKxSxE (scan_layers=True)", False: "per-layer tuples (scan_layers=False)"}
      raise ValueError(f"The cache is {layouts[cache.stacked]} but the model has scan_layers={cfg.scan_layers}; "
                       "build it with init_cache(model.config, ...).")
    if cache.num_layers != cfg.num_layers:
      raise ValueError(f"The cache has {cache.num_layers} layers, the model {cfg.num_layers}; build it with "
                       "init_cache(cfg, ...).")


class Transformer(nnx.Module):
  """The decoder LM: `model(tokens_NxT, positions_NxT, attn_mask_NxTxS, cache=None, cache_index=None)`.

  Without a cache S == T and the call returns `(logits_NxTxV, None)`. With a cache the k/v of the T new tokens are
  written at slots [cache_index, cache_index + T) of every row and the new tokens attend over all S cache slots
  through `attn_mask_NxTxS`; the call returns `(logits_NxTxV, updated_cache)`. Logits are always float32.
  `cache_index + T` must not exceed the cache's max_len: `lax.dynamic_update_slice` would clamp the write
  silently (a traced index cannot be checked).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    # One draw from `rngs`, split explicitly: every `rngs.params()` call under `nnx.eval_shape` costs time that grows
    # with the traced program, which made abstract builds of 30-layer models take seconds.
    keys = jax.random.split(rngs.params(), cfg.num_layers + 2)
    embed_key, head_key, layer_keys_L = keys[0], keys[1], keys[2:]
    self.embed = _param(embed_key, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg.weight_dtype)
    if cfg.scan_layers:
      self.layers = stacked_blocks(cfg, layer_keys_L)
    else:
      self.layers = nnx.List([Block(cfg, key=key) for key in layer_keys_L])
    self.final_norm = _param(None, (cfg.embed_dim,), ("norm",), cfg.weight_dtype, "ones")
    if not cfg.tie_embeddings:
      self.lm_head = _param(head_key, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), cfg.weight_dtype)

  def hidden(self, tokens_NxT: jax.Array, positions_NxT: jax.Array, attn_mask_NxTxS: jax.Array, *,
             cache: KVCache | None = None, cache_index: jax.Array | int | None = None
             ) -> tuple[jax.Array, KVCache | None]:
    """The final-normed hidden states (compute dtype) and the updated cache; `logits` maps them to the vocabulary.

    `attn_mask_NxTxS` may be a `PromptGroupMask` (no cache): the B rows are then packed [prompt b, its G
    completions], every projection runs once over all B*L tokens, and each completion attends over its own prompt
    and itself only (`attend_prompt_groups`; `shared_prompt.completion_hidden`).
    """
    cfg = self.config
    _check_inputs(cfg, tokens_NxT, positions_NxT, attn_mask_NxTxS, cache, cache_index)
    x_NxTxD = jnp.take(self.embed[...], tokens_NxT, axis=0).astype(cfg.compute_dtype)
    x_NxTxD = constrain(x_NxTxD, ("batch", "length", "act_embed"), cfg.sharding_rules)
    attn_mask_NxTxS = jax.tree.map(lambda m: m.astype(bool), attn_mask_NxTxS)
    if cfg.scan_layers:
      x_NxTxD, new_cache = self._scan_blocks(x_NxTxD, positions_NxT, attn_mask_NxTxS, cache, cache_index)
    else:
      x_NxTxD, new_cache = self._loop_blocks(x_NxTxD, positions_NxT, attn_mask_NxTxS, cache, cache_index)
    hidden_NxTxD = rms_norm(x_NxTxD, self.final_norm[...], cfg.norm_eps)
    return hidden_NxTxD, new_cache

  def _loop_blocks(self, x_NxTxD, positions_NxT, attn_mask_NxTxS, cache, cache_index):
    """The unrolled form (`scan_layers=False`): a Python loop over the `nnx.List` of blocks."""
    call = remat_block(Block.__call__, self.config.remat, prevent_cse=True)
    new_k, new_v = [], []
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i], jnp.asarray(cache_index, jnp.int32))
      x_NxTxD, new_layer_cache = call(block, x_NxTxD, positions_NxT, attn_mask_NxTxS, layer_cache)
      if new_layer_cache is not None:
        new_k.append(new_layer_cache[0])
        new_v.append(new_layer_cache[1])
    return x_NxTxD, None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))

  def _scan_blocks(self, x_NxTxD, positions_NxT, attn_mask_NxTxS, cache, cache_index):
    """The scanned form (`scan_layers=True`): one `jax.lax.scan` over the stacked blocks' split state.

    Each step merges one layer's slice of the parameters into a `Block` and calls it. The carry is the residual
    stream and, with a cache, the whole stacked LxNxKxSxE buffers, which each layer updates in place at its own index
    (scanned alongside its parameters); positions and mask are closed over (the same for every layer).

    `jax.lax.scan` over `nnx.split` rather than `nnx.scan`: nnx.scan refuses a module captured from an outer trace
    ("Cannot extract graph node from different trace level"), which is how the sampler's decode `while_loop` calls
    the model (a module closed over by a `lax` loop); the pure scan has no such check and lowers to the same loop.
    """
    graphdef, state = nnx.split(self.layers)

    def block_fn(state_l, x_NxTxD, layer_cache):
      return Block.__call__(nnx.merge(graphdef, state_l), x_NxTxD, positions_NxT, attn_mask_NxTxS, layer_cache)
    # prevent_cse=False: the scan already keeps the recomputation from being merged with the forward.
    block_fn = remat_block(block_fn, self.config.remat, prevent_cse=False, checkpoint=jax.checkpoint)
    layers_L = jnp.arange(self.config.num_layers, dtype=jnp.int32)

    if cache is None:
      def body(x_NxTxD, xs):
        state_l, _ = xs
        return block_fn(state_l, x_NxTxD, None)[0], None
      x_NxTxD, _ = jax.lax.scan(body, x_NxTxD, (state, layers_L))
      return x_NxTxD, None

    index = jnp.asarray(cache_index, jnp.int32)

    def body_cached(carry, xs):
      x_NxTxD, k_LxNxKxSxE, v_LxNxKxSxE = carry
      state_l, layer = xs
      x_NxTxD, (k_LxNxKxSxE, v_LxNxKxSxE) = block_fn(state_l, x_NxTxD, (k_LxNxKxSxE, v_LxNxKxSxE, index, layer))
      return (x_NxTxD, k_LxNxKxSxE, v_LxNxKxSxE), None
    (x_NxTxD, k_LxNxKxSxE, v_LxNxKxSxE), _ = jax.lax.scan(body_cached, (x_NxTxD, cache.k, cache.v),
                                                         (state, layers_L))
    return x_NxTxD, KVCache(k=k_LxNxKxSxE, v=v_LxNxKxSxE)

  def head_weight(self) -> jax.Array:
    """The VxD output projection, [out, in] like every weight (the embedding itself when tied)."""
    return self.embed[...] if self.config.tie_embeddings else self.lm_head[...]

  def logits(self, hidden_NxTxD: jax.Array) -> jax.Array:
    """float32 logits from hidden states (the matmul accumulates in float32 even with bfloat16 compute)."""
    w_VxD = self.head_weight().astype(self.config.compute_dtype)
    logits_NxTxV = linear(hidden_NxTxD, w_VxD, preferred_element_type=jnp.float32)
    return constrain(logits_NxTxV, ("batch", "length", "act_vocab"), self.config.sharding_rules)

  def __call__(self, tokens_NxT: jax.Array, positions_NxT: jax.Array, attn_mask_NxTxS: jax.Array, *,
               cache: KVCache | None = None, cache_index: jax.Array | int | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    hidden_NxTxD, new_cache = self.hidden(tokens_NxT, positions_NxT, attn_mask_NxTxS, cache=cache,
                                          cache_index=cache_index)
    return self.logits(hidden_NxTxD), new_cache


def pure(state: Any) -> Any:
  """The same nnx.State with each Variable replaced by its value (plain arrays / ShapeDtypeStructs): the form the
  train state, the optimizer, orbax and `nnx.merge` all accept, whose tree matches a tree of shardings."""
  return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(cfg: ModelConfig, *, seed: int = 0) -> Transformer:
  """The model built by shape only (`nnx.eval_shape`): every parameter a ShapeDtypeStruct, nothing allocated."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))


def unrolled(model: Transformer) -> Transformer:
  """A scanned model (`scan_layers=True`) as the unrolled form with the same weights: each stacked Lx... block
  parameter sliced into its L per-layer ones (inside a jitted program, one copy of the block weights); an unrolled
  model is returned as it is. The sampler decodes this way (`SamplingConfig.unroll_layers`): under scan every decode
  step would copy each layer's weights out of the stacked arrays, which made the H200's rollout 1.7x slower."""
  cfg = model.config
  if not cfg.scan_layers:
    return model
  graphdef = nnx.graphdef(abstract_model(cfg.replace(scan_layers=False)))
  state = pure(nnx.state(model))
  stacked = state["layers"]
  layers = nnx.State({l: jax.tree.map(lambda x, l=l: x[l], stacked) for l in range(cfg.num_layers)})
  return nnx.merge(graphdef, nnx.State({**{k: v for k, v in state.items() if k != "layers"}, "layers": layers}))


def create_model(cfg: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Random-initialised model; with a mesh each parameter is created directly on its sharding.

  Builds by shape first, derives each parameter's NamedSharding from its logical axes and
  `cfg.sharding_rules`, then runs the initialiser under jit with those `out_shardings`, so no parameter is ever
  materialised whole on one device. Without a mesh this is `Transformer(cfg, rngs=nnx.Rngs(seed))`.
  """
  if mesh is None:
    return Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract_state = nnx.split(abstract_model(cfg, seed=seed))
  init = jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))),
                 out_shardings=param_shardings(abstract_state, mesh, cfg.sharding_rules))
  return nnx.merge(graphdef, init())
