"""The estimators give the same gradients when the batch is split over 8 fake CPU devices: jit + NamedSharding,
shard_map and pmap with a cross-device mean (as on a TPU pod). Zero-success groups are included."""
import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import _tabular
from tsallis_jax import distributed, garl_grad, grpo_grad, paft_grad

NUM_DEVICES = 8
NUM_PROMPTS = 16
NUM_SAMPLES = 4
NUM_TRAJ = 5


@pytest.fixture(scope="module")
def setup():
  assert jax.device_count() >= NUM_DEVICES, "tests/conftest.py sets 8 fake CPU devices"
  key_params, key_offsets, key_phi, key_idx = jax.random.split(jax.random.key(0), 4)
  params = _tabular.init_shared_params(key_params, NUM_TRAJ)
  offset_BxK = jax.random.normal(key_offsets, (NUM_PROMPTS, NUM_TRAJ))
  idx_BxG = jax.random.randint(key_idx, (NUM_PROMPTS, NUM_SAMPLES), 0, NUM_TRAJ)
  # Prompts 0 and 5 have no success at all (log w = -inf everywhere): the zero-success convention under sharding.
  phi_offset_BxK = jax.random.normal(key_phi, (NUM_PROMPTS, NUM_TRAJ)).at[jnp.array([0, 5])].set(-jnp.inf)
  batch = {"idx_BxG": idx_BxG, "offset_BxK": offset_BxK, "phi_offset_BxK": phi_offset_BxK}
  rewards_BxG = (idx_BxG % 2 == 0).astype(jnp.float32).at[3].set(0.0)
  keys_B = jax.random.split(jax.random.key(7), NUM_PROMPTS)  # one resampling key per prompt, split before sharding
  mesh = distributed.make_mesh({"data": NUM_DEVICES}, devices=jax.devices()[:NUM_DEVICES])
  return params, batch, rewards_BxG, keys_B, mesh


QS = (0.0, 0.5, 1.0)


def _all_grads(p, b, r, k, q):
  """Every estimator's gradients in one dict (one compilation per test mode); q is traced."""
  return {
    "garl_rloo": garl_grad(_tabular.shared_logprob_fn, p, b, q=q, baseline="rloo")[0],
    "garl_plugin": garl_grad(_tabular.shared_logprob_fn, p, b, q=q, baseline="none")[0],
    "paft": paft_grad(_tabular.shared_logprob_fn, p, b, k, q=q)[0],
    "grpo": grpo_grad(_tabular.shared_logprob_fn, p, b, rewards_BxG=r)[0],
  }


def test_jit_named_sharding_matches_single_device(setup):
  params, batch, rewards_BxG, keys_B, mesh = setup
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  args = jax.device_put((params, batch, rewards_BxG, keys_B),
                        (replicated, batch_sharding, batch_sharding, batch_sharding))
  assert len(args[1]["idx_BxG"].sharding.device_set) == NUM_DEVICES
  single = jax.jit(_all_grads)
  sharded = jax.jit(_all_grads, in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding,
                                              replicated), out_shardings=replicated)
  for q in QS:
    q = jnp.float32(q)
    reference = single(params, batch, rewards_BxG, keys_B, q)
    chex.assert_tree_all_finite(reference)
    chex.assert_trees_all_close(sharded(*args, q), reference, rtol=1e-5, atol=1e-7, custom_message=f"q={q}")


def test_shard_map_and_pmap_with_cross_device_mean(setup):
  params, batch, rewards_BxG, keys_B, mesh = setup
  specs = (P(), P("data"), P("data"), P("data"), P())
  split = lambda x: x.reshape((NUM_DEVICES, x.shape[0] // NUM_DEVICES) + x.shape[1:])
  single = jax.jit(_all_grads)

  def per_device(p, b, r, k, q):
    return jax.lax.pmean(_all_grads(p, b, r, k, q), "data")  # equal shards: mean of shard means = global mean

  # check_vma=False: each device differentiates its own shard's mean loss, then an explicit pmean (pmap style).
  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
  # check_vma=True (the default): the gradient of a replicated parameter is already summed over the axis by
  # autodiff, so each device's mean loss yields the sum of the shard means; divide by the axis size.
  summed = jax.jit(jax.shard_map(lambda p, b, r, k, q: jax.tree.map(
      lambda g: g / jax.lax.axis_size("data"), _all_grads(p, b, r, k, q)), mesh=mesh, in_specs=specs,
      out_specs=P()))
  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0, 0, None))
  for q in (0.0, 1.0):
    q = jnp.float32(q)
    reference = single(params, batch, rewards_BxG, keys_B, q)
    chex.assert_trees_all_close(mapped(params, batch, rewards_BxG, keys_B, q), reference, rtol=1e-5, atol=1e-7,
                                custom_message=f"shard_map q={q}")
    chex.assert_trees_all_close(summed(params, batch, rewards_BxG, keys_B, q), reference, rtol=1e-5, atol=1e-7,
                                custom_message=f"shard_map (vma) q={q}")
    out = pmapped(params, jax.tree.map(split, batch), split(rewards_BxG), split(keys_B), q)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], out), reference, rtol=1e-5, atol=1e-7,
                                custom_message=f"pmap q={q}")
