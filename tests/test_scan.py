"""Layers under scan (`ModelConfig.scan_layers`) against the unrolled loop, remat policies, and both layouts through
the HF loader and Orbax checkpoints."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tsallis_jax.model import (ModelConfig, Transformer, abstract_model, create_model, init_cache,
                               make_attention_mask, make_positions)
from tsallis_jax.model.config import REMAT_POLICIES
from tsallis_jax.model.hf_io import hf_tensors, load_hf_checkpoint, save_hf_checkpoint
from tsallis_jax.train import checkpoint as ckpt_lib

CFG = ModelConfig.tiny(num_layers=3, scan_layers=True)


def _random_params(model: Transformer, seed: int = 1) -> Transformer:
  """Random values everywhere (norms and biases start at 1 / 0, which hides per-layer mix-ups)."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) + (1.0 if x.ndim <= 2 else 0.0)
            for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _pair(cfg=CFG) -> tuple[Transformer, Transformer]:
  """(scanned, unrolled) models with the same random weights: the scanned one stacks the unrolled one's layers."""
  scanned = _random_params(Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0)))
  unrolled = nnx.merge(nnx.split(Transformer(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))[0],
                       _unstack(nnx.state(scanned), cfg.num_layers))
  return scanned, unrolled


def _unstack(state: nnx.State, num_layers: int) -> nnx.State:
  """A scanned model's state in the unrolled layout (layer l of every stacked block parameter)."""
  flat = []
  for path, var in nnx.to_flat_state(state):
    if path[0] == "layers":
      axes = var.get_metadata()["logical_axes"][1:]  # without "layers"
      flat += [(("layers", l, *path[1:]), var.replace(var.get_value()[l], logical_axes=axes))
               for l in range(num_layers)]
    else:
      flat.append((path, var))
  return nnx.from_flat_state(flat)


def _batch():
  tokens_NxT = jnp.array([[5, 9, 3, 7, 11, 2], [0, 0, 4, 8, 6, 10]], jnp.int32)
  return tokens_NxT, tokens_NxT != 0


def _loss(model, tokens_NxT, pad_NxT):
  logits = model(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))[0]
  return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * pad_NxT)


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss))


def test_init_stacks_the_unrolled_layers_with_a_layers_axis():
  scanned, unrolled = create_model(CFG), create_model(CFG.replace(scan_layers=False))
  chex.assert_trees_all_equal(_unstack(nnx.state(scanned), CFG.num_layers), nnx.state(unrolled))
  assert scanned.layers.attn.q_proj.get_metadata()["logical_axes"] == ("layers", "heads", "head_dim", "embed")
  abstract = abstract_model(CFG)
  assert abstract.layers.mlp.up_proj.shape == (CFG.num_layers, CFG.mlp_dim, CFG.embed_dim)


def test_scan_and_unrolled_give_the_same_logits_and_gradients():
  scanned, unrolled = _pair()
  tokens_NxT, pad_NxT = _batch()
  value_s, grads_s = _value_and_grad(scanned, tokens_NxT, pad_NxT)
  value_u, grads_u = _value_and_grad(unrolled, tokens_NxT, pad_NxT)
  np.testing.assert_allclose(value_s, value_u, rtol=1e-6)
  chex.assert_trees_all_close(_unstack(grads_s, CFG.num_layers), grads_u, atol=1e-5, rtol=2e-5)


def test_scan_and_unrolled_give_the_same_cached_prefill_and_decode():
  scanned, unrolled = _pair()
  tokens_NxT, pad_NxT = _batch()
  n, t = tokens_NxT.shape
  max_len, prompt_len = 8, 3
  slot_pad_NxS = jnp.zeros((n, max_len), bool).at[:, :t].set(pad_NxT)
  mask_NxSxS = jnp.tril(jnp.ones((max_len, max_len), bool))[None] & slot_pad_NxS[:, None, :]
  positions_NxT = make_positions(pad_NxT)
  full = scanned(tokens_NxT, positions_NxT, make_attention_mask(pad_NxT))[0]

  @nnx.jit
  def step(model, cache, tokens, positions, mask, index):
    return model(tokens, positions, mask, cache=cache, cache_index=index)

  outs = {}
  for name, model in (("scan", scanned), ("unrolled", unrolled)):
    cache = init_cache(model.config, batch_size=n, max_len=max_len)
    assert cache.stacked == (name == "scan") and cache.num_layers == CFG.num_layers
    assert (cache.max_len, cache.batch_size) == (max_len, n)
    logits, cache = step(model, cache, tokens_NxT[:, :prompt_len], positions_NxT[:, :prompt_len],
                         mask_NxSxS[:, :prompt_len], jnp.int32(0))
    decoded = [logits]
    for i in range(prompt_len, t):
      logits, cache = step(model, cache, tokens_NxT[:, i:i + 1], positions_NxT[:, i:i + 1], mask_NxSxS[:, i:i + 1],
                           jnp.int32(i))
      decoded.append(logits)
    outs[name] = (jnp.concatenate(decoded, axis=1), cache)
  real = np.asarray(pad_NxT)
  np.testing.assert_allclose(np.asarray(outs["scan"][0])[real], np.asarray(full)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(outs["scan"][0])[real], np.asarray(outs["unrolled"][0])[real], atol=1e-5)
  chex.assert_shape(outs["scan"][1].k, (CFG.num_layers, n, CFG.num_kv_heads, max_len, CFG.head_dim))
  for layer in range(CFG.num_layers):
    np.testing.assert_allclose(outs["scan"][1].k[layer], outs["unrolled"][1].k[layer], atol=1e-5)
    np.testing.assert_allclose(outs["scan"][1].v[layer], outs["unrolled"][1].v[layer], atol=1e-5)


def test_a_cache_of_the_other_layout_is_refused():
  scanned, _ = _pair()
  tokens_NxT, pad_NxT = _batch()
  wrong = init_cache(CFG.replace(scan_layers=False), batch_size=2, max_len=6)
  with pytest.raises(ValueError, match="scan_layers"):
    scanned(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT), cache=wrong, cache_index=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_remat_policy_gives_the_same_gradient(scan_layers):
  cfg = CFG.replace(scan_layers=scan_layers)
  model = _random_params(Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  tokens_NxT, pad_NxT = _batch()

  def loss(params, graphdef):
    return _loss(nnx.merge(graphdef, params), tokens_NxT, pad_NxT)

  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef)
  for policy in REMAT_POLICIES[1:]:
    graphdef_p = nnx.split(Transformer(cfg.replace(remat=policy), rngs=nnx.Rngs(0)))[0]
    value_p, grads_p = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, graphdef_p)
    np.testing.assert_allclose(value, value_p, rtol=1e-6)
    chex.assert_trees_all_close(grads, grads_p, atol=1e-5, rtol=2e-5)


def test_remat_accepts_the_old_bools_and_refuses_unknown_policies():
  assert ModelConfig.tiny(remat=True).remat == "full" and ModelConfig.tiny(remat=False).remat == "none"
  assert ModelConfig.tiny(remat="dots_saveable").remat == "dots_saveable"
  with pytest.raises(ValueError, match="remat='everything' is not one of"):
    ModelConfig.tiny(remat="everything")


def test_hf_files_are_the_same_from_either_layout_and_load_into_either(tmp_path):
  scanned, unrolled = _pair(CFG.replace(arch="qwen2", qkv_bias=True, qk_norm=False, tie_embeddings=False))
  from_scan, from_unrolled = dict(hf_tensors(scanned)), dict(hf_tensors(unrolled))
  assert sorted(from_scan) == sorted(from_unrolled) and "model.layers.2.self_attn.q_proj.bias" in from_scan
  for name, array in from_scan.items():
    np.testing.assert_array_equal(array, from_unrolled[name], err_msg=name)
  save_hf_checkpoint(scanned, tmp_path / "scan", max_shard_size="40KB")  # sharded: names split over files
  for scan_layers, reference in ((True, scanned), (False, unrolled)):
    loaded = load_hf_checkpoint(tmp_path / "scan", scan_layers=scan_layers)
    assert loaded.config.scan_layers == scan_layers
    chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), nnx.state(reference, nnx.Param))


def test_a_checkpoint_of_the_other_layout_names_scan_layers(tmp_path):
  scanned, unrolled = _pair()
  ckpt_lib.save_params(tmp_path / "params", nnx.state(scanned, nnx.Param))
  restored = ckpt_lib.load_params(tmp_path / "params", nnx.state(scanned, nnx.Param))
  chex.assert_trees_all_equal(restored, nnx.state(scanned, nnx.Param))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"scan_layers=True.*model has scan_layers=False"):
    ckpt_lib.load_params(tmp_path / "params", nnx.state(unrolled, nnx.Param))

  checkpointer = ckpt_lib.Checkpointer(tmp_path / "run", max_to_keep=2)
  checkpointer.save(1, {"params": nnx.state(unrolled, nnx.Param)}, {"step": 1})
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"scan_layers=False.*scan_layers=True"):
    checkpointer.restore({"params": nnx.state(scanned, nnx.Param)})
  assert checkpointer.latest_step() == 1  # nothing moved aside as damaged
  step, state, _ = checkpointer.restore({"params": nnx.state(unrolled, nnx.Param)})
  assert step == 1
  checkpointer.close()


def test_export_rebuilds_the_layout_the_checkpoint_was_written_in(tmp_path):
  import orbax.checkpoint as ocp
  from tsallis_jax.train import export
  from tsallis_jax.train.config import TrainConfig
  scanned, _ = _pair()
  state_dir = tmp_path / "state"
  ocp.PyTreeCheckpointer().save(state_dir, {"params": nnx.to_pure_dict(nnx.state(scanned, nnx.Param))})
  cfg = TrainConfig(model="tiny", model_overrides="remat=true,scan_layers=false")
  assert export._with_stored_layout(cfg, state_dir).model_overrides == "remat=true,scan_layers=true"
  assert export._with_stored_layout(TrainConfig(model="tiny"), state_dir).model_overrides == "scan_layers=true"
  same = TrainConfig(model="tiny", model_overrides="scan_layers=true")
  assert export._with_stored_layout(same, state_dir) is same


def test_unrolled_view_of_a_scanned_model_has_its_weights_and_logits():
  """`model.unrolled`: a scanned model as the unrolled form, layer l's weights the stacked arrays' slice l."""
  from tsallis_jax.model import unrolled
  scanned, reference = _pair()
  view = unrolled(scanned)
  assert not view.config.scan_layers and len(view.layers) == CFG.num_layers
  chex.assert_trees_all_equal(nnx.state(view), nnx.state(reference))
  tokens_NxT, pad_NxT = _batch()
  args = (tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))
  np.testing.assert_allclose(view(*args)[0], scanned(*args)[0], atol=1e-5)
  assert unrolled(reference) is reference


def _scan_lengths(jaxpr) -> list[int]:
  """The lengths of every scan in a jaxpr, nested ones included."""
  from jax.extend.core import jaxprs_in_params
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    for sub in jaxprs_in_params(eqn.params):
      lengths += _scan_lengths(sub)
  return lengths


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_a_scanned_model_samples_the_same_with_its_layers_unrolled(chunk_rows):
  """SamplingConfig.unroll_layers: the scanned model's rollout runs without a scan over its layers (no scan of length
  L in the jaxpr; chunking's own loop is one of length 2), and draws the same samples as the scanned decode for the
  same key."""
  from tsallis_jax import sampler as sampler_lib
  from tsallis_jax.sampler import SamplingConfig
  scanned, _ = _pair()
  graphdef, params = nnx.split(scanned)
  tokens_BxP = jnp.array([[0, 5, 9, 3], [4, 8, 6, 10]], jnp.int32)
  config = SamplingConfig(num_samples=2, max_new_tokens=5, temperature=1.0, stop_ids=(1,), chunk_rows=chunk_rows)
  runs = {}
  for unroll in (True, False):
    cfg = dataclasses.replace(config, unroll_layers=unroll)
    fn = lambda p, cfg=cfg: sampler_lib.generate_impl(graphdef, p, tokens_BxP, tokens_BxP != 0, jax.random.key(3), cfg)
    assert (CFG.num_layers in _scan_lengths(jax.make_jaxpr(fn)(params).jaxpr)) == (not unroll)
    runs[unroll] = fn(params)
  for name in ("tokens_NxT", "mask_NxT", "lengths_N"):
    np.testing.assert_array_equal(getattr(runs[True], name), getattr(runs[False], name), err_msg=name)
  np.testing.assert_allclose(runs[True].logp_NxT, runs[False].logp_NxT, atol=1e-5)
