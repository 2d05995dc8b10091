"""JAX's persistent compilation cache for training runs (`TrainConfig.compile_cache`).

XLA writes every program that took over a second to compile (the sampler's rollout, the train step, evaluation) to a
folder, keyed by the program's HLO, the JAX/XLA version, the compile flags and the devices. A later run of the same
programs (a re-run, another seed or q of the same config, a resumed job) reads them back instead of compiling: on
the `smollm2` benchmark the first step of a re-run is the warm-cache row of `experiments/benchmarks/results/
results.md`. A changed model, shape or flag is a different key, so a stale entry is never used.

The cache is process-wide JAX configuration. `enable` sets it only when nothing else has: the environment variable
`JAX_COMPILATION_CACHE_DIR`, an earlier `jax.config.update("jax_compilation_cache_dir", ...)` and
`jax_enable_compilation_cache=False` all take precedence, so a user (or the test suite) keeps control. On a pod give
every host the same object-store folder (e.g. `gs://bucket/xla_cache`) or a local one per host.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def enable(path: str) -> str | None:
  """Points JAX's persistent compilation cache at `path` (`~` expanded; "" = leave the cache as it is) unless it is
  already set or disabled; returns the folder in use (None when the cache is off)."""
  current = jax.config.jax_compilation_cache_dir
  if not jax.config.jax_enable_compilation_cache:
    return None
  if current or not path:
    return current or None
  if "://" not in path:
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  log.debug("persistent compilation cache: %s", path)
  return path
