"""The Transformer: shapes, padding, KV cache, bfloat16, remat, sharding over 8 fake CPU devices, abstract build."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax import distributed
from tsallis_jax.model import (KVCache, ModelConfig, Transformer, abstract_model, create_model, init_cache,
                               make_attention_mask, make_positions, param_shardings)

ARCH_CONFIGS = {
  "qwen3": ModelConfig.tiny(),
  "qwen2": ModelConfig.tiny(arch="qwen2", qkv_bias=True, qk_norm=False, tie_embeddings=False),
  "llama": ModelConfig.tiny(arch="llama", qk_norm=False, num_kv_heads=1),
}


def _random_params(model: Transformer, seed: int = 1) -> Transformer:
  """Norm weights and biases are 1 / 0 at init, which hides layout bugs: give every parameter random values."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray((1.0 if x.ndim == 1 else 0.0) + 0.3 * rng.standard_normal(x.shape), jnp.float32)
            for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _left_padded_batch():
  tokens_NxT = jnp.array([[5, 9, 3, 7, 11, 2], [0, 0, 4, 8, 6, 10], [0, 0, 0, 0, 12, 13]], jnp.int32)
  return tokens_NxT, tokens_NxT != 0


@nnx.jit
def _forward(model, tokens_NxT, pad_mask_NxT):
  logits_NxTxV, cache = model(tokens_NxT, make_positions(pad_mask_NxT), make_attention_mask(pad_mask_NxT))
  assert cache is None
  return logits_NxTxV


def test_masks_and_positions_match_loops():
  _, pad_NxT = _left_padded_batch()
  mask_NxTxT, pos_NxT = np.asarray(make_attention_mask(pad_NxT)), np.asarray(make_positions(pad_NxT))
  pad = np.asarray(pad_NxT)
  for n in range(pad.shape[0]):
    real_so_far = 0
    for t in range(pad.shape[1]):
      real_so_far += int(pad[n, t])
      assert pos_NxT[n, t] == max(real_so_far - 1, 0)
      for s in range(pad.shape[1]):
        assert mask_NxTxT[n, t, s] == (s <= t and pad[n, s])


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_forward_shapes_dtype_and_padding_invariance(arch):
  cfg = ARCH_CONFIGS[arch]
  model = _random_params(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens_NxT, pad_NxT = _left_padded_batch()
  logits_NxTxV = _forward(model, tokens_NxT, pad_NxT)
  chex.assert_shape(logits_NxTxV, (3, 6, cfg.vocab_size))
  assert logits_NxTxV.dtype == jnp.float32
  chex.assert_tree_all_finite(logits_NxTxV)
  # A left-padded row gives the same logits on its real tokens as the same row without padding.
  for n in (1, 2):
    real = np.asarray(pad_NxT[n])
    alone_1xT = tokens_NxT[n:n + 1, real]
    alone_logits = _forward(model, alone_1xT, jnp.ones_like(alone_1xT, bool))
    # rtol: the batch and the row alone are different GEMM shapes (float32 summation order), |logits| up to ~5.
    np.testing.assert_allclose(logits_NxTxV[n, real], alone_logits[0], atol=1e-5, rtol=1e-5)
  # Causality: changing the last token leaves the earlier logits of real tokens unchanged.
  changed_NxT = tokens_NxT.at[:, -1].set(1)
  earlier = np.asarray(pad_NxT[:, :-1])
  np.testing.assert_allclose(np.asarray(_forward(model, changed_NxT, pad_NxT))[:, :-1][earlier],
                             np.asarray(logits_NxTxV)[:, :-1][earlier], atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_cached_prefill_and_decode_match_full_forward(arch):
  cfg = ARCH_CONFIGS[arch]
  model = _random_params(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens_NxT, pad_NxT = _left_padded_batch()
  full_logits_NxTxV = _forward(model, tokens_NxT, pad_NxT)
  graphdef, params = nnx.split(model)
  n, t = tokens_NxT.shape
  max_len, prompt_len = 8, 3
  positions_NxT = make_positions(pad_NxT)

  @jax.jit
  def step(params, cache, tokens_NxU, positions_NxU, mask_NxUxS, index):
    return nnx.merge(graphdef, params)(tokens_NxU, positions_NxU, mask_NxUxS, cache=cache, cache_index=index)

  cache = init_cache(cfg, batch_size=n, max_len=max_len, dtype=jnp.float32)
  assert isinstance(cache, KVCache) and len(cache.k) == cfg.num_layers
  chex.assert_shape(cache.k[0], (n, cfg.num_kv_heads, max_len, cfg.head_dim))
  slot_pad_NxS = jnp.zeros((n, max_len), bool).at[:, :t].set(pad_NxT)
  causal_SxS = jnp.tril(jnp.ones((max_len, max_len), bool))
  mask_NxSxS = causal_SxS[None] & slot_pad_NxS[:, None, :]
  # Prefill the first prompt_len tokens, then decode the rest one token at a time.
  logits, cache = step(params, cache, tokens_NxT[:, :prompt_len], positions_NxT[:, :prompt_len],
                       mask_NxSxS[:, :prompt_len], jnp.int32(0))
  got = [logits]
  for i in range(prompt_len, t):
    logits, cache = step(params, cache, tokens_NxT[:, i:i + 1], positions_NxT[:, i:i + 1], mask_NxSxS[:, i:i + 1],
                         jnp.int32(i))
    got.append(logits)
  cached_logits_NxTxV = jnp.concatenate(got, axis=1)
  real = np.asarray(pad_NxT)
  # atol: decode steps multiply a few rows with the weight on the left (`linear`), the full forward does not: float32
  # summation order on logits of magnitude up to ~5 (a wrong cache slot or mask moves them by O(0.1)).
  np.testing.assert_allclose(np.asarray(cached_logits_NxTxV)[real], np.asarray(full_logits_NxTxV)[real], atol=3e-5)


def test_query_chunked_prefill_into_the_cache_matches_full_forward():
  """A prefill longer than `attention_query_chunk` attends over the kv-head-major cache in query blocks; it writes
  slots [0, T) of every row and kv head and leaves the later slots zero."""
  cfg = ARCH_CONFIGS["qwen2"].replace(attention_query_chunk=4)
  model = _random_params(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens_NxT, pad_NxT = _left_padded_batch()
  n, t = tokens_NxT.shape
  max_len = t + 3
  mask_NxTxS = jnp.pad(make_attention_mask(pad_NxT), ((0, 0), (0, 0), (0, max_len - t)))

  @nnx.jit
  def prefill(model, cache):
    return model(tokens_NxT, make_positions(pad_NxT), mask_NxTxS, cache=cache, cache_index=jnp.int32(0))

  logits_NxTxV, cache = prefill(model, init_cache(cfg, batch_size=n, max_len=max_len))
  real = np.asarray(pad_NxT)
  np.testing.assert_allclose(np.asarray(logits_NxTxV)[real], np.asarray(_forward(model, tokens_NxT, pad_NxT))[real],
                             atol=1e-5)
  for buf_NxKxSxE in [*cache.k, *cache.v]:  # per-layer slabs in either layout
    buf_NxKxSxE = np.asarray(buf_NxKxSxE)
    assert np.all(buf_NxKxSxE[:, :, t:] == 0) and np.all(np.abs(buf_NxKxSxE[:, :, :t]).sum(-1) > 0)


def test_bfloat16_compute_keeps_float32_logits_close():
  cfg = ModelConfig.tiny()
  model32 = _random_params(Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model32)
  model16 = nnx.merge(nnx.split(Transformer(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0)))[0], params)
  tokens_NxT, pad_NxT = _left_padded_batch()
  logits32, logits16 = _forward(model32, tokens_NxT, pad_NxT), _forward(model16, tokens_NxT, pad_NxT)
  assert logits16.dtype == jnp.float32
  real = np.asarray(pad_NxT)
  err = np.abs(np.asarray(logits16 - logits32))[real].max()
  scale = np.abs(np.asarray(logits32))[real].max()
  assert 0 < err < 0.05 * scale  # bfloat16 differs, but not by much


def test_remat_and_query_chunked_attention_give_the_same_loss_and_gradients():
  cfg = ModelConfig.tiny()
  tokens_NxT, pad_NxT = _left_padded_batch()
  graphdef, params = nnx.split(_random_params(Transformer(cfg, rngs=nnx.Rngs(0))))

  def loss(params, graphdef):
    logits = _forward(nnx.merge(graphdef, params), tokens_NxT, pad_NxT)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * pad_NxT)

  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef)
  # remat, and attention over query blocks of 4 (6 queries: one full block and one padded block).
  for variant in (cfg.replace(remat=True), cfg.replace(remat="dots_saveable"), cfg.replace(attention_query_chunk=4)):
    graphdef_variant = nnx.split(Transformer(variant, rngs=nnx.Rngs(0)))[0]
    value_v, grads_v = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef_variant)
    np.testing.assert_allclose(value, value_v, rtol=1e-6)
    chex.assert_trees_all_close(grads, grads_v, atol=1e-5, rtol=2e-5)  # float32 summation order (|g| up to ~8)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sharded_build_and_forward_match_unsharded(scan_layers):
  assert jax.device_count() == 8
  cfg = ModelConfig.tiny(num_kv_heads=4, scan_layers=scan_layers)
  mesh = distributed.make_mesh({"data": 2, "fsdp": 4})
  sharded = create_model(cfg, seed=0, mesh=mesh)
  plain = create_model(cfg, seed=0)
  chex.assert_trees_all_close(nnx.state(sharded), nnx.state(plain), atol=0)
  # Parameters are really split along the model width over fsdp: the MLP kernel, the embedding, the projections.
  # Scanned blocks lead with the unsharded L axis ("layers").
  block, lead = (sharded.layers, (cfg.num_layers,)) if scan_layers else (sharded.layers[0], ())
  gate = block.mlp.gate_proj[...]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(*[None] * len(lead), None, "fsdp")  # FxD, [out, in]
  assert gate.addressable_shards[0].data.shape == (*lead, cfg.mlp_dim, cfg.embed_dim // 4)
  assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  q = block.attn.q_proj[...]
  assert q.addressable_shards[0].data.shape == (*lead, cfg.num_heads, cfg.head_dim, cfg.embed_dim // 4)

  tokens_NxT, pad_NxT = _left_padded_batch()
  tokens_NxT, pad_NxT = jnp.concatenate([tokens_NxT, tokens_NxT[:1]]), jnp.concatenate([pad_NxT, pad_NxT[:1]])
  graphdef, params = nnx.split(sharded)

  @jax.jit
  def forward(params, tokens_NxT, pad_NxT):
    return _forward(nnx.merge(graphdef, params), tokens_NxT, pad_NxT)

  with jax.set_mesh(mesh):
    sharded_logits = forward(params, tokens_NxT, pad_NxT)
  plain_logits = forward(nnx.state(plain), tokens_NxT, pad_NxT)
  np.testing.assert_allclose(sharded_logits, plain_logits, atol=1e-5)


def test_sharding_rules_drop_indivisible_and_missing_axes():
  cfg = ModelConfig.tiny(scan_layers=True)
  mesh = distributed.make_mesh({"data": 2, "fsdp": 4})
  # kv_heads -> tensor (a mesh axis this mesh lacks), then fsdp (4 does not divide the 2 kv heads): both dropped.
  rules = cfg.sharding_rules + (("kv_heads", ("tensor", "fsdp")),)
  shardings = param_shardings(nnx.split(abstract_model(cfg))[1], mesh, rules)
  k_spec = shardings["layers"]["attn"]["k_proj"].spec  # LxKxExD (scan_layers): layers unsharded
  assert k_spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")  # kv_heads dropped, embed over fsdp
  unrolled = param_shardings(nnx.split(abstract_model(cfg.replace(scan_layers=False)))[1], mesh, rules)
  assert unrolled["layers"][0]["attn"]["k_proj"].spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  norm_spec = shardings["final_norm"].spec
  assert norm_spec == jax.sharding.PartitionSpec(None)


def test_abstract_qwen3_0_6b_allocates_nothing_and_counts_params():
  cfg = ModelConfig.qwen3_0_6b()
  state = nnx.state(abstract_model(cfg))
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  d, f, h, k, e = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = d * h * e + 2 * d * k * e + h * e * d + 3 * d * f + 2 * d + 2 * e
  expected = cfg.vocab_size * d + cfg.num_layers * per_layer + d
  assert sum(int(np.prod(x.shape)) for x in leaves) == expected
  assert 0.59e9 < expected < 0.61e9  # "0.6B" with tied embeddings


def test_bad_inputs_raise_clear_errors():
  cfg = ModelConfig.tiny()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens_NxT, pad_NxT = _left_padded_batch()
  with pytest.raises(ValueError, match="attn_mask"):
    model(tokens_NxT, make_positions(pad_NxT), jnp.ones((3, 6, 5), bool))
  with pytest.raises(ValueError, match="cache_index"):
    model(tokens_NxT, make_positions(pad_NxT), jnp.ones((3, 6, 8), bool), cache=init_cache(cfg, 3, 8))
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="model_type"):
    ModelConfig.from_hf_config({"model_type": "gpt2"})
  hf = ModelConfig.smollm2_135m().to_hf_config()
  with pytest.raises(ValueError, match="dynamic"):
    ModelConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "dynamic", "factor": 8.0}})
  with pytest.raises(ValueError, match="low_freq_factor"):
    ModelConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  with pytest.raises(ValueError, match="yarn"):
    ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
  with pytest.raises(ValueError, match="num_hidden_layers"):
    ModelConfig.from_hf_config({k: v for k, v in hf.items() if k != "num_hidden_layers"})
  with pytest.raises(ValueError, match="max_len"):
    init_cache(cfg, batch_size=2, max_len=0)


def test_hf_config_round_trip():
  llama3 = ModelConfig.tiny(arch="llama", qk_norm=False, rope_llama3=(8.0, 1.0, 4.0, 8192))
  for cfg in [*ARCH_CONFIGS.values(), llama3, ModelConfig.qwen3_0_6b(), ModelConfig.smollm2_135m()]:
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (4, 4), (1, 64), (5, 13)])
def test_linear_weight_left_path_equals_the_plain_product_with_gradients(lead):
  """`linear` multiplies 2..64 token rows as w @ x.T behind optimisation barriers on CPU (1 and 65 rows: einsum);
  both paths give x @ w.T and the same gradients, and the barrier path is really the one taken."""
  from tsallis_jax.model import transformer
  rows = int(np.prod(lead))
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.standard_normal((*lead, 24)), jnp.float32)
  w_FxD = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
  got = jax.jit(transformer.linear)(x, w_FxD)
  chex.assert_shape(got, (*lead, 40))
  np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(w_FxD).T, rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(transformer.linear)(x, w_FxD))
  assert ("optimization_barrier" in jaxpr) == (2 <= rows <= transformer.WEIGHT_LEFT_MAX_ROWS), jaxpr

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
  grads = jax.grad(loss(transformer.linear), argnums=(0, 1))(x, w_FxD)
  want = jax.grad(loss(lambda x, w: jnp.einsum("...d,fd->...f", x, w)), argnums=(0, 1))(x, w_FxD)
  chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead, d, f", [((64, 48), 16, 64), ((5, 13), 24, 40), ((64, 48), 64, 16), ((3, 30), 8, 512)])
def test_linear_training_rows_backward_equals_the_einsum_gradients(lead, d, f, dtype):
  """Above 64 rows on CPU, projections with M * F > D * (M + F) take the einsum with a hand-written backward
  (`_linear_input_transposed_grad`, dW = (x^T dy)^T); its gradients equal autodiff of the plain einsum up to
  summation order (float32: 2e-6 of the largest entry; bfloat16: one rounding, 1e-2), with the float32 logits output
  the LM head asks for and the input's dtypes, and the custom path is really the one taken where the rule says so
  (and only there)."""
  from tsallis_jax.model import transformer
  rows = int(np.prod(lead))
  rng = np.random.default_rng(rows + d + f)
  x = jnp.asarray(rng.standard_normal((*lead, d)), dtype)
  w_FxD = jnp.asarray(0.1 * rng.standard_normal((f, d)), dtype)
  taken = "custom_vjp_call" in str(jax.make_jaxpr(transformer.linear)(x, w_FxD))
  assert taken == (rows > transformer.WEIGHT_LEFT_MAX_ROWS and rows * f > d * (rows + f))

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
  ours = jax.jit(jax.grad(loss(lambda x, w: transformer.linear(x, w, preferred_element_type=jnp.float32)),
                          argnums=(0, 1)))(x, w_FxD)
  want = jax.jit(jax.grad(loss(lambda x, w: jnp.einsum("...d,fd->...f", x, w, preferred_element_type=jnp.float32)),
                          argnums=(0, 1)))(x, w_FxD)
  for got, ref in zip(ours, want):
    assert got.dtype == ref.dtype
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    tol = (2e-6 if dtype == jnp.float32 else 1e-2) * np.max(np.abs(ref))
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
