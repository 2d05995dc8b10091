"""q schedules (SFT-then-RL as q: 1 -> 0) and the learning-rate schedule, evaluated from the step inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsallis_jax.qlog import validate_q_schedule
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.schedules import (clip_by_global_norm, learning_rate_schedule, q_schedule,
                                         q_schedule_from_config)


@pytest.mark.parametrize("kind, expect", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.0, 0.0]),
    ("step", [1.0, 1.0, 0.0, 0.0]),
    ("cosine", [1.0, (1 + np.cos(np.pi / 4)) / 2, 0.0, 0.0]),
])
def test_q_schedules_from_1_to_0_over_8_steps(kind, expect):
  fn = jax.jit(q_schedule(kind, 1.0, 0.0, 8))
  got = [float(fn(jnp.int32(s))) for s in (0, 2, 8, 20)]
  np.testing.assert_allclose(got, expect, atol=1e-6)
  validate_q_schedule(lambda s: float(fn(jnp.int32(s))), range(0, 30))


def test_traced_q_endpoints_share_one_compilation():
  cfg = TrainConfig(q_schedule="linear", num_steps=10)
  traces = []

  @jax.jit
  def q_at(step, q0, q1):
    traces.append(1)
    return q_schedule_from_config(cfg, q0, q1)(step)

  assert float(q_at(jnp.int32(5), 1.0, 0.0)) == pytest.approx(0.5)
  assert float(q_at(jnp.int32(5), 0.5, 0.5)) == pytest.approx(0.5)
  assert float(q_at(jnp.int32(10), 0.2, 0.9)) == pytest.approx(0.9)
  assert len(traces) == 1


def test_learning_rate_warms_up_then_decays():
  cfg = TrainConfig(learning_rate=1e-3, warmup_steps=4, num_steps=12, lr_schedule="linear")
  lr = learning_rate_schedule(cfg)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 8, 12)], [2.5e-4, 6.25e-4, 1e-3, 5e-4, 0.0],
                             rtol=1e-5, atol=1e-9)
  assert float(learning_rate_schedule(TrainConfig(learning_rate=3e-4))(100)) == pytest.approx(3e-4)



def _grads(params, scale, key):
  return jax.tree.map(lambda x: (scale * jax.random.normal(key, x.shape)).astype(x.dtype), params)


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 64 * 48).reshape(64, 48), "b": jnp.linspace(0.0, 1.0, 48),
          "h": jnp.linspace(-2.0, 2.0, 3 * 16 * 16).reshape(3, 16, 16).astype(jnp.bfloat16)}


@pytest.mark.parametrize("scale", [1e-3, 1e3], ids=["below_max_norm", "clipped"])
def test_scalar_choice_clip_equals_optax(scale):
  """Below the threshold the gradients come back bit for bit; clipped, g * (max_norm / norm) equals optax's
  g / norm * max_norm to rounding: within 2 ulp of each dtype (float32, bfloat16)."""
  grads = _grads(PARAMS, scale, jax.random.key(0))
  norm = float(optax.tree.norm(grads))
  assert (norm > 1.0) == (scale > 1.0)  # the two cases really sit on either side of the threshold
  theirs = jax.jit(lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])(grads)
  ours = jax.jit(lambda g: clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])(grads)
  for name in PARAMS:
    assert ours[name].dtype == theirs[name].dtype == PARAMS[name].dtype
    got, want = np.asarray(ours[name].astype(jnp.float32)), np.asarray(theirs[name].astype(jnp.float32))
    if scale < 1.0:
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      np.testing.assert_allclose(got, want, rtol=2 * float(jnp.finfo(PARAMS[name].dtype).eps), atol=0, err_msg=name)
  if scale > 1.0:  # and it did clip, to the global norm 1
    assert float(optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), ours))) == pytest.approx(1.0, rel=1e-2)


def _clip_then_adamw(clip):
  tx = optax.chain(clip, optax.adamw(1e-3, weight_decay=0.01))

  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, jax.jit(step, donate_argnums=(0, 1))


@pytest.mark.parametrize("scale", [1e-3, 1e3], ids=["below_max_norm", "clipped"])
def test_scalar_choice_clip_trains_as_optax(scale):
  """Three jitted AdamW steps after each clip. The clipped gradients differ by rounding (`g * (m / n)` against
  `g / n * m`), and the programs fuse differently, so XLA may contract a multiply-add of the second moment into one
  FMA in one and not the other: agreement to the rounding of each leaf's dtype (float32; one ulp of a bfloat16
  parameter), not bit for bit."""
  results = []
  for clip in (optax.clip_by_global_norm(1.0), clip_by_global_norm(1.0)):
    tx, step = _clip_then_adamw(clip)
    p = jax.tree.map(jnp.copy, PARAMS)
    s = tx.init(p)
    for i in range(3):
      p, s = step(p, s, _grads(PARAMS, scale, jax.random.key(i)))
    results.append(jax.tree.leaves((p, s)))
  for ours, theirs in zip(*results, strict=True):
    assert ours.dtype == theirs.dtype
    # A moment sums gradients of both signs, so an entry near zero carries the last-bit differences of the clipped
    # gradients at the scale of the leaf's largest entries: a few ulp of the leaf's dtype at that scale. The step
    # count (int32) is exact.
    want = np.asarray(theirs, np.float32)
    eps = float(jnp.finfo(ours.dtype).eps) if jnp.issubdtype(ours.dtype, jnp.floating) else 0.0
    np.testing.assert_allclose(np.asarray(ours, np.float32), want, rtol=2 * eps, atol=8 * eps * np.abs(want).max())


def test_scalar_choice_clip_needs_less_scratch_than_optax():
  """XLA's own memory analysis of a step whose gradients are made inside it: optax's per-element select keeps
  a further copy of a gradient leaf alive; ours does not (on `smollm2`'s step: 1026 -> 768 MB of scratch)."""
  params = {f"w{i}": jnp.zeros((256, 1024), jnp.float32) for i in range(4)}
  temps = []
  for clip in (optax.clip_by_global_norm(1.0), clip_by_global_norm(1.0)):
    tx = optax.chain(clip, optax.adamw(1e-3))

    def step(p, s, x_BxD):
      g = jax.grad(lambda p: sum(jnp.sum(jnp.tanh(x_BxD @ w)) for w in p.values()))(p)
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), jnp.ones((8, 256))).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  assert temps[1] <= temps[0] - 256 * 1024 * 4, temps


def test_scalar_choice_clip_turns_a_nan_norm_into_nan_as_optax_does():
  grads = {"w": jnp.asarray([1.0, jnp.nan, 2.0])}
  ours = clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]["w"]
  theirs = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())[0]["w"]
  assert np.all(np.isnan(np.asarray(theirs))) and np.all(np.isnan(np.asarray(ours)))
