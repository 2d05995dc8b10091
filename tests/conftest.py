"""Test-wide settings: 8 fake CPU devices for sharding tests, strict rank promotion, and a fresh persistent
compilation cache per session (the trainer turns the cache on, `TrainConfig.compile_cache`; a folder of the session's
own keeps runs from reading another session's programs, and the user's ~/.cache untouched).

These must be set before JAX initialises its backends, so they live here, at collection time.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

# JAX reads it at import; the command lines the tests run as subprocesses inherit it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tsallis_jax_test_xla_")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# The command lines set the host allocator (`host_memory.keep_freed_memory`) before JAX starts; tests that call a
# command line's main() in this process must not change the suite's allocator (tests/test_host_memory.py checks the
# real function in fresh interpreters, and command lines run as subprocesses use it).
from tsallis_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory = dict
