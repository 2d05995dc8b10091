"""`ModelConfig.attention_impl`: `jax.nn.dot_product_attention` (XLA) equals the einsum path; cuDNN's clear errors.

Parity to float32 tolerance for outputs and gradients with left padding (fully masked query rows), GQA, the KV cache
(prefill and single-token decode) and the query-chunked path.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax.model import ModelConfig, Transformer, init_cache, make_attention_mask, make_positions
from tsallis_jax.model.transformer import attend, attend_in_query_chunks

from test_model import _left_padded_batch, _random_params  # random norms/biases; rows with 0, 2 and 4 pad tokens


def _qkv(n=3, t=6, h=4, k=2, e=8, s=None, seed=0):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return normal(n, t, h, e), normal(n, k, s, e), normal(n, k, s, e)


def test_attend_xla_equals_einsum_with_fully_masked_rows_and_gqa():
  q_NxTxHxE, k_NxKxSxE, v_NxKxSxE = _qkv()
  _, pad_NxT = _left_padded_batch()
  mask_NxTxT = make_attention_mask(pad_NxT)
  assert not bool(jnp.all(jnp.any(mask_NxTxT, axis=-1)))  # some query rows (padding) attend to nothing

  def loss(impl, q, k, v):
    out_NxTxHxE = attend(q, k, v, mask_NxTxT, impl=impl)
    return jnp.sum(jnp.sin(out_NxTxHxE)), out_NxTxHxE

  for impl in ("einsum", "xla"):
    chex.assert_tree_all_finite(jax.grad(lambda *a: loss(impl, *a)[0], argnums=(0, 1, 2))(q_NxTxHxE, k_NxKxSxE,
                                                                                          v_NxKxSxE))
  (_, out_e), grads_e = jax.value_and_grad(lambda *a: loss("einsum", *a), argnums=(0, 1, 2), has_aux=True)(
      q_NxTxHxE, k_NxKxSxE, v_NxKxSxE)
  (_, out_x), grads_x = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True))(
      q_NxTxHxE, k_NxKxSxE, v_NxKxSxE)
  chex.assert_trees_all_close(out_x, out_e, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(grads_x, grads_e, atol=1e-6, rtol=1e-6)


def test_attend_in_query_chunks_xla_equals_einsum():
  q_NxTxHxE, k_NxKxSxE, v_NxKxSxE = _qkv(t=7, s=9)
  mask_NxTxS = jnp.asarray(np.random.default_rng(1).random((3, 7, 9)) < 0.5).at[0, 2].set(False)
  f = lambda impl: jax.value_and_grad(
      lambda q: jnp.sum(jnp.sin(attend_in_query_chunks(q, k_NxKxSxE, v_NxKxSxE, mask_NxTxS, 3, impl=impl))))(
          q_NxTxHxE)
  chex.assert_trees_all_close(f("xla"), f("einsum"), atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(f("xla")[0], jnp.sum(jnp.sin(attend(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, mask_NxTxS))),
                              atol=1e-5)


def _pair(base: ModelConfig):
  """The same random params under the einsum and the xla implementation."""
  model = _random_params(Transformer(base.replace(attention_impl="einsum"), rngs=nnx.Rngs(0)))
  graphdef_x = nnx.graphdef(Transformer(base.replace(attention_impl="xla"), rngs=nnx.Rngs(0)))
  return model, nnx.merge(graphdef_x, nnx.state(model))


@pytest.mark.parametrize("chunk", [None, 4])
def test_model_xla_equals_einsum_logits_and_gradients(chunk):
  """Left padding, GQA (4 query heads over 2 kv heads), optionally query-chunked attention (4 < T = 6)."""
  model_e, model_x = _pair(ModelConfig.tiny(attention_query_chunk=chunk))
  tokens_NxT, pad_NxT = _left_padded_batch()

  @nnx.jit
  def loss_and_grads(model):
    def loss(m):
      logits_NxTxV, _ = m(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))
      logq_NxTxV = jax.nn.log_softmax(logits_NxTxV, axis=-1)
      return -jnp.sum(jnp.where(pad_NxT[:, :, None], logq_NxTxV[..., :1], 0.0)), logits_NxTxV
    return nnx.value_and_grad(loss, has_aux=True)(model)

  (_, logits_e), grads_e = loss_and_grads(model_e)
  (_, logits_x), grads_x = loss_and_grads(model_x)
  chex.assert_tree_all_finite((logits_x, grads_x))
  np.testing.assert_allclose(logits_x, logits_e, atol=2e-5, rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_e))
  chex.assert_trees_all_close(grads_x, grads_e, atol=1e-5 * scale, rtol=1e-4)


def test_model_xla_kv_cache_prefill_and_decode_equal_einsum():
  model_e, model_x = _pair(ModelConfig.tiny())
  cfg = model_e.config
  tokens_NxT, pad_NxT = _left_padded_batch()
  n, t = tokens_NxT.shape
  max_len, prompt_len = 8, 3
  positions_NxT = make_positions(pad_NxT)
  slot_pad_NxS = jnp.zeros((n, max_len), bool).at[:, :t].set(pad_NxT)
  mask_NxSxS = jnp.tril(jnp.ones((max_len, max_len), bool))[None] & slot_pad_NxS[:, None, :]

  @nnx.jit
  def call(model, cache, tokens_NxU, positions_NxU, mask_NxUxS, index):
    return model(tokens_NxU, positions_NxU, mask_NxUxS, cache=cache, cache_index=index)

  got = {}
  for name, model in (("einsum", model_e), ("xla", model_x)):
    cache = init_cache(cfg, batch_size=n, max_len=max_len, dtype=jnp.float32)
    logits, cache = call(model, cache, tokens_NxT[:, :prompt_len], positions_NxT[:, :prompt_len],
                         mask_NxSxS[:, :prompt_len], jnp.int32(0))
    steps = [logits]
    for i in range(prompt_len, t):  # single-token decode steps
      logits, cache = call(model, cache, tokens_NxT[:, i:i + 1], positions_NxT[:, i:i + 1], mask_NxSxS[:, i:i + 1],
                           jnp.int32(i))
      steps.append(logits)
    got[name] = (jnp.concatenate(steps, axis=1), cache)
  chex.assert_tree_all_finite(got["xla"])
  chex.assert_trees_all_close(got["xla"], got["einsum"], atol=2e-5, rtol=1e-5)


def test_auto_is_the_default_and_configs_validate_the_impl():
  assert ModelConfig.tiny().attention_impl == "auto"
  q_NxTxHxE, k_NxKxSxE, v_NxKxSxE = _qkv()
  mask_NxTxT = make_attention_mask(_left_padded_batch()[1])
  auto = attend(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, mask_NxTxT, impl="auto")
  einsum = attend(q_NxTxHxE, k_NxKxSxE, v_NxKxSxE, mask_NxTxT, impl="einsum")
  if jax.default_backend() == "cpu":  # "auto" is the einsum path here, bit for bit
    np.testing.assert_array_equal(auto, einsum)
  else:  # jax.nn.dot_product_attention with JAX's choice (device_check.sh runs this file on a GPU)
    np.testing.assert_allclose(auto, einsum, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    ModelConfig.tiny(attention_impl="flash")
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs dtype='bfloat16'"):
    ModelConfig.tiny(attention_impl="cudnn")  # float32 compute
  with pytest.raises(ValueError, match="head_dim a multiple of 8"):
    ModelConfig.tiny(attention_impl="cudnn", dtype="bfloat16", head_dim=12)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is there on a GPU (device_check.sh runs this file)")
def test_cudnn_on_cpu_raises_a_clear_error():
  cfg = ModelConfig.tiny(attention_impl="cudnn", dtype="bfloat16")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens_NxT, pad_NxT = _left_padded_batch()
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a CUDA GPU backend.*attention_impl='auto'"):
    model(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))
