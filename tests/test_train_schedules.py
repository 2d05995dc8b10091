"""q schedules (SFT-then-RL as q: 1 -> 0) and the learning-rate schedule, evaluated from the step inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsallis_jax.qlog import validate_q_schedule
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.schedules import learning_rate_schedule, q_schedule, q_schedule_from_config


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
