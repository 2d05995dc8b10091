"""tsallis_jax.distributed on 8 fake CPU devices (tests/conftest.py): detection, mesh, per-host batch rows."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from tsallis_jax import distributed


# --- detect_multihost: pure, reads a given environment ------------------------------------------------------------

def test_single_host_by_default():
  info = distributed.detect_multihost(environ={})
  assert info.method == "single" and not info.initialized


@pytest.mark.parametrize("environ", [
    {"TPU_WORKER_HOSTNAMES": "t1w0,t1w1,t1w2,t1w3"},
    {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"},
    {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"},
    {"TSALLIS_DISTRIBUTED": "auto"},
])
def test_tpu_pod_environments_use_auto_detection(environ):
  assert distributed.detect_multihost(environ=environ).method == "auto"


@pytest.mark.parametrize("environ", [
    {"TPU_WORKER_HOSTNAMES": "localhost"},  # a single-host TPU VM (v4-8, v5litepod-8)
    {"TPU_WORKER_HOSTNAMES": "t1w0,t1w1", "TSALLIS_DISTRIBUTED": "off"},
    {"TSALLIS_NUM_PROCESSES": "1"},
])
def test_single_host_environments_do_not_initialize(environ):
  assert distributed.detect_multihost(environ=environ).method == "single"


def test_explicit_environment_variables():
  info = distributed.detect_multihost(environ={
      "TSALLIS_COORDINATOR": "127.0.0.1:1234", "TSALLIS_NUM_PROCESSES": "2", "TSALLIS_PROCESS_ID": "1"})
  assert (info.method, info.coordinator_address, info.num_processes, info.process_id) == (
      "explicit", "127.0.0.1:1234", 2, 1)


def test_explicit_arguments_override_environment():
  info = distributed.detect_multihost("10.1.1.1:99", 4, 3, environ={
      "TSALLIS_COORDINATOR": "127.0.0.1:1234", "TSALLIS_NUM_PROCESSES": "2", "TSALLIS_PROCESS_ID": "1"})
  assert (info.coordinator_address, info.num_processes, info.process_id) == ("10.1.1.1:99", 4, 3)


@pytest.mark.parametrize("kwargs, environ, match", [
    ({}, {"TSALLIS_NUM_PROCESSES": "2"}, "TSALLIS_COORDINATOR"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {}, r"\[0, 2\)"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "host"}, {}, "port"),
    ({}, {"TSALLIS_NUM_PROCESSES": "two"}, "not an integer"),
    ({}, {"TSALLIS_DISTRIBUTED": "yes"}, "auto"),
])
def test_bad_settings_raise_clear_errors(kwargs, environ, match):
  with pytest.raises(ValueError, match=match):
    distributed.detect_multihost(environ=environ, **kwargs)


def test_maybe_initialize_is_a_noop_on_a_single_host(monkeypatch):
  for name in ("TSALLIS_COORDINATOR", "TSALLIS_NUM_PROCESSES", "TSALLIS_PROCESS_ID", "TSALLIS_DISTRIBUTED",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  info = distributed.maybe_initialize()
  assert info.method == "single" and not info.initialized and not calls
  assert distributed.is_main_process()


def test_maybe_initialize_passes_explicit_settings(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
  monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  info = distributed.maybe_initialize("127.0.0.1:5555", 2, 1)
  assert info.initialized and info.method == "explicit"
  assert ("jax_cpu_collectives_implementation", "gloo") in calls
  (kwargs,) = [c for c in calls if isinstance(c, dict)]
  assert (kwargs["coordinator_address"], kwargs["num_processes"], kwargs["process_id"]) == ("127.0.0.1:5555", 2, 1)


# --- mesh -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis_sizes, expected", [
    ({"data": -1}, {"data": 8}),
    ({"data": -1, "model": 2}, {"data": 4, "model": 2}),
    ({"data": 2, "fsdp": -1, "model": 2}, {"data": 2, "fsdp": 2, "model": 2}),
    ({"data": 8, "model": 1}, {"data": 8, "model": 1}),
])
def test_make_mesh_over_all_devices(axis_sizes, expected):
  mesh = distributed.make_mesh(axis_sizes)
  assert dict(mesh.shape) == expected
  assert tuple(mesh.axis_names) == tuple(axis_sizes)
  assert set(mesh.axis_types) == {AxisType.Auto}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize("axis_sizes, match", [
    ({"data": 3}, "8 devices"),
    ({"data": -1, "model": 3}, "does not divide the 8 devices"),
    ({"data": 2, "model": 2}, "set one axis to -1"),
    ({"data": -1, "model": -1}, "at most one"),
    ({"data": 0}, "positive integer"),
    ({}, "empty"),
])
def test_make_mesh_rejects_bad_sizes(axis_sizes, match):
  with pytest.raises(ValueError, match=match):
    distributed.make_mesh(axis_sizes)


def test_resolve_axis_sizes_is_pure():
  assert distributed.resolve_axis_sizes({"data": -1, "model": 4}, 256) == {"data": 64, "model": 4}
  with pytest.raises(ValueError, match="32 devices"):
    distributed.resolve_axis_sizes({"data": 3, "model": 4}, 32)


# --- per-host rows and global batches -----------------------------------------------------------------------------

def test_host_batch_slice_single_process_is_whole_batch():
  assert distributed.host_batch_slice(16) == slice(0, 16)
  mesh = distributed.make_mesh({"data": -1, "model": 2})
  assert distributed.host_batch_slice(16, mesh, "data") == slice(0, 16)
  assert distributed.process_local_rows(16, mesh, "data") == 16


def test_host_batch_slice_rejects_indivisible_batch():
  mesh = distributed.make_mesh({"data": -1, "model": 2})
  with pytest.raises(ValueError, match="multiple of 4"):
    distributed.host_batch_slice(6, mesh, "data")
  with pytest.raises(ValueError, match="not mesh axes"):
    distributed.host_batch_slice(8, mesh, "batch")


def test_global_batch_from_local_shards_rows_over_data():
  mesh = distributed.make_mesh({"data": -1, "model": 2})
  rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
  batch = {"tokens_BxT": rows, "reward_B": rows[:, 0].astype(np.float32)}
  spec = PartitionSpec("data")
  global_batch = distributed.global_batch_from_local(batch, mesh, spec, global_batch_size=8)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, global_batch), batch)
  assert global_batch["tokens_BxT"].sharding.spec == spec
  # Each data shard holds 8 / 4 rows.
  assert {s.data.shape for s in global_batch["tokens_BxT"].addressable_shards} == {(2, 3)}
  total = jax.jit(lambda b: jnp.sum(b["tokens_BxT"]))(global_batch)
  assert int(total) == int(rows.sum())


def test_maybe_initialize_lets_jax_detect_a_tpu_pod(monkeypatch):
  calls = []
  for name in ("TSALLIS_COORDINATOR", "TSALLIS_NUM_PROCESSES", "TSALLIS_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1w0,t1w1")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(("config", a)))
  info = distributed.maybe_initialize()
  assert info.initialized and info.method == "auto"
  # No addresses passed (JAX's cluster detection fills them in), and no gloo switch off CPU.
  assert calls == [((), {"initialization_timeout": 300})]
