"""Checkpoints: round trip with shardings, damaged newest step -> warning and fallback, atomic writes, max_to_keep.

Damage is done on disk, to the newest step's files, the way a crash or a full disk leaves them.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tsallis_jax import distributed
from tsallis_jax.train.checkpoint import (Checkpointer, CheckpointMismatchError, CorruptCheckpointWarning, load_params,
                                          save_params)


def _state(mesh, scale):
  row = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  rep = NamedSharding(mesh, PartitionSpec())
  return {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2) * scale, row),
          "step": jax.device_put(jnp.int32(scale), rep),
          "key": jax.device_put(jax.random.key_data(jax.random.key(scale)), rep)}


@pytest.fixture(scope="module")
def mesh():
  return distributed.make_mesh({"data": 4, "fsdp": 2})


def _meta(step):
  return {"step": step, "data_state": {"next_index": 3 * step}, "best": {"metric": 0.5, "step": step}}


def test_typed_prng_key_round_trips_as_its_key_data(tmp_path, mesh):
  """The train state holds a typed key; the checkpoint stores its key data and restore wraps it back."""
  rep = NamedSharding(mesh, PartitionSpec())
  state = {"step": jax.device_put(jnp.int32(5), rep), "key": jax.device_put(jax.random.key(42), rep)}
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  ckpt.save(5, state, _meta(5))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  _, restored, _ = ckpt.restore(target)
  ckpt.close()
  assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(42)))
  np.testing.assert_array_equal(jax.random.bits(restored["key"]), jax.random.bits(jax.random.key(42)))
  stored = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "5" / "state").item_metadata
  assert tuple(stored["key"].shape) == (2,)  # raw uint32 key data on disk


def test_round_trip_keeps_values_and_shardings(tmp_path, mesh):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  state = _state(mesh, 3)
  ckpt.save(3, state, _meta(3))
  step, restored, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  assert step == 3 and meta["data_state"] == {"next_index": 9}
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored[k].sharding.is_equivalent_to(state[k].sharding, state[k].ndim)
  ckpt.close()


def _damage_arrays(step_dir: pathlib.Path):
  """Truncates every array data file of the step to half its size (what an interrupted copy leaves)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files, list((step_dir / "state").rglob("*"))
  for p in files:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The step's merged array data files (`state/d/*`; the per-process `ocdbt.process_*` copies are not read)."""
  files = sorted(p for p in (step_dir / "state" / "d").iterdir() if p.is_file())
  assert files, list((step_dir / "state").rglob("*"))
  return files


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["missing_array_file", "truncated_array_file", "garbage_state_metadata",
                                    "truncate_arrays", "corrupt_meta", "remove_state"])
def test_damaged_newest_step_falls_back_to_previous_with_a_warning(tmp_path, mesh, damage):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(mesh, step), _meta(step))
  newest = tmp_path / "checkpoints" / "2"
  if damage == "missing_array_file":
    _array_files(newest)[0].unlink()
  elif damage == "truncated_array_file":
    first = _array_files(newest)[0]
    first.write_bytes(first.read_bytes()[:len(first.read_bytes()) // 2])
  elif damage == "garbage_state_metadata":
    (newest / "state" / "_METADATA").write_bytes(b"\x00\xffgarbage{")
  elif damage == "truncate_arrays":
    _damage_arrays(newest)
  elif damage == "corrupt_meta":
    for p in (newest / "meta").rglob("*"):
      if p.is_file():
        p.write_text("{ not json")
  else:
    import shutil
    shutil.rmtree(newest / "state")
  damaged = _files(newest)
  kept = tmp_path / "checkpoints" / "2.corrupt"
  with pytest.warns(CorruptCheckpointWarning, match=rf"step 2 in .* is unreadable .*moving it to {kept}"):
    step, restored, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, _state(mesh, 0)))
  assert step == 1 and meta["step"] == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(_state(mesh, 1)["w"]))
  # The damaged step is kept aside, byte for byte, for inspection, never read again, and step 2 can be written anew.
  assert _files(kept) == damaged and not newest.exists()
  ckpt.save(2, _state(mesh, 2), _meta(2))
  step, restored, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, _state(mesh, 0)))
  assert step == 2
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(_state(mesh, 2)["w"]))
  ckpt.close()


def test_checkpoint_of_another_model_shape_is_refused_and_kept(tmp_path, mesh):
  """A readable checkpoint of other shapes (another config, or the weights' old [in, out] layout) is an error that
  names the array, not a damaged step: nothing is moved aside and the run does not restart from scratch."""
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _state(mesh, 1), _meta(1))
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)  # a new process resuming the run
  transposed = dict(_state(mesh, 0), w=jnp.zeros((2, 8)))
  with pytest.raises(CheckpointMismatchError, match=r"step 1 .*w: checkpoint \(8, 2\), model \(2, 8\)"):
    ckpt.restore(transposed)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  step, restored, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, _state(mesh, 0)))  # the right model still resumes
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(_state(mesh, 1)["w"]))
  ckpt.close()
  save_params(tmp_path / "params", {"w": jnp.ones((8, 2))})
  with pytest.raises(CheckpointMismatchError, match=r"params checkpoint .*w: checkpoint \(8, 2\), model \(2, 8\)"):
    load_params(tmp_path / "params", {"w": jnp.zeros((2, 8))})


def test_unfinished_save_is_never_listed_and_old_steps_survive(tmp_path, mesh):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(mesh, step), _meta(step))
  assert sorted(ckpt.latest.all_steps()) == [2, 3]  # max_to_keep removed step 1 after step 3 was complete
  # A save killed half-way leaves orbax's temporary folder; it is not a step and restore ignores it.
  tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 10)
  ckpt2 = Checkpointer(str(tmp_path), max_to_keep=2)
  assert sorted(ckpt2.latest.all_steps()) == [2, 3]
  step, _, _ = ckpt2.restore(jax.tree.map(jnp.zeros_like, _state(mesh, 0)))
  assert step == 3
  ckpt.close()
  ckpt2.close()


def test_no_checkpoint_returns_none(tmp_path, mesh):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
  assert ckpt.restore(_state(mesh, 0)) is None
  ckpt.close()


def test_params_only_checkpoint_round_trip(tmp_path, mesh):
  params = {"a": _state(mesh, 5)["w"]}
  save_params(str(tmp_path / "p"), params)
  back = load_params(str(tmp_path / "p"), jax.tree.map(jnp.zeros_like, params))
  np.testing.assert_array_equal(np.asarray(back["a"]), np.asarray(params["a"]))
  with pytest.raises(FileNotFoundError, match="init_checkpoint"):
    load_params(str(tmp_path / "missing"), params)


_FAILING_SAVE = """
import resource, sys
import jax, jax.numpy as jnp
from tsallis_jax.train.checkpoint import Checkpointer, CheckpointSaveError
ckpt = Checkpointer(sys.argv[1], max_to_keep=1)
ckpt.save(1, {"w": jnp.ones((4, 4))}, {"step": 1})
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the disk is full from now on: writes over 4 KiB fail
try:
  ckpt.save(2, {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}, {"step": 2})  # incompressible
except CheckpointSaveError as e:
  print("save failed:", e)
else:
  sys.exit("the save of a 4 MiB array under a 4 KiB file-size limit succeeded")
"""


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
  """With max_to_keep=1, a save that fails mid-write (file-size limit: EFBIG, as a full disk gives ENOSPC) leaves
  step 1 readable; the next process resumes from it."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-c", _FAILING_SAVE, str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "save failed: saving step 2" in result.stdout and "the previous checkpoints [1] are untouched" in result.stdout
  ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
  assert ckpt.latest.all_steps() == [1]
  step, restored, meta = ckpt.restore({"w": jnp.zeros((4, 4))})
  assert step == 1 and meta == {"step": 1}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((4, 4)))
  ckpt.close()
