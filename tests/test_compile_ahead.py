"""`train.compile_ahead`: the train step compiled in a background thread, used by the first matching call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tsallis_jax import distributed
from tsallis_jax.train import load_config, loop, train_and_evaluate
from tsallis_jax.train.compile_ahead import AheadOfTime


def _step(mesh):
  rep = NamedSharding(mesh, PartitionSpec())

  def fn(state, batch, key, q_range):
    if batch["x"].shape[0] == 3:
      raise ValueError("three rows are refused by this step")
    noise = jax.random.uniform(key, batch["x"].shape)
    return state + jnp.sum(batch["x"] * noise) * q_range[0], {"n": batch["x"].shape[0]}
  return jax.jit(fn, in_shardings=(rep, {"x": rep}, rep, rep), donate_argnums=(0,))


def test_the_call_runs_the_program_compiled_ahead_and_other_shapes_the_jitted_one():
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  jitted = _step(mesh)
  ahead = AheadOfTime(jitted, mesh)
  key, q_range = jax.random.key(0), jnp.asarray([0.5, 0.5], jnp.float32)
  batch = {"x": jnp.arange(4.0)}
  future = ahead.start(jnp.float32(1.0), {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}, key, q_range)
  assert ahead.start(jnp.float32(1.0), batch, key, q_range) is future  # one compile per shape
  got, _ = ahead(jnp.float32(1.0), batch, key, q_range)
  assert jitted._cache_size() == 0  # the jitted function never compiled: the call ran the ahead-compiled program
  want, _ = jitted(jnp.float32(1.0), batch, key, q_range)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ahead(jnp.float32(1.0), {"x": jnp.arange(5.0)}, key, q_range)  # another shape: through the jitted function
  assert jitted._cache_size() == 2


def test_a_compile_that_fails_in_the_thread_raises_at_the_first_call():
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  ahead = AheadOfTime(_step(mesh), mesh)
  key, q_range = jax.random.key(0), jnp.asarray([0.5, 0.5], jnp.float32)
  ahead.start(jnp.float32(1.0), {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, key, q_range)
  with pytest.raises(ValueError, match="three rows are refused"):
    ahead(jnp.float32(1.0), {"x": jnp.arange(3.0)}, key, q_range)


def test_the_trainer_s_first_update_runs_the_program_compiled_beside_its_rollout(tmp_path):
  cfg = load_config("smoke", ["num_steps=1"])
  programs = loop.setup(cfg)[0].programs
  train_and_evaluate(cfg, str(tmp_path), programs=programs)
  assert programs.train_step.jitted._cache_size() == 0


def test_a_process_that_exits_during_a_compile_ahead_waits_for_it(tmp_path):
  """The first step can raise while the update still compiles in its daemon thread; a thread killed inside XLA's
  compiler at interpreter exit can abort the process after the real error. The exit handler joins it first: the
  stand-in compile (one second, then a file) finishes before the process ends, which returns 0."""
  import subprocess
  import sys
  import textwrap
  done = tmp_path / "compiled"
  script = textwrap.dedent(f"""
      import pathlib, time
      import jax, jax.numpy as jnp
      from tsallis_jax import distributed
      from tsallis_jax.train.compile_ahead import AheadOfTime

      class SlowCompile:
        def lower(self, *args):
          return self
        def compile(self):
          time.sleep(1.0)
          pathlib.Path({str(done)!r}).write_text("done")
          return lambda *args: None

      mesh = distributed.make_mesh({{"data": 1, "fsdp": 1}}, devices=jax.devices()[:1])
      AheadOfTime(SlowCompile(), mesh).start(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))
      print("exiting")  # at once: the compile is still running
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "exiting" in result.stdout and done.read_text() == "done"
