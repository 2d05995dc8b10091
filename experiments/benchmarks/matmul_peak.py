"""This machine's float32 matmul peak and memory read bandwidth, measured (the train step's FLOP utilisation and
the roofline of `flops.step_floor_s`).

  python -m experiments.benchmarks.matmul_peak [--size 2048] [--reps 10]

Times a jitted float32 `a @ b` of square matrices through JAX (the library the step runs on) and through numpy
(its BLAS) at a few sizes, and reports the best median as GFLOP/s (2 n^3 flops per product). The read bandwidth is
the best median of a jitted sum and numpy's sum over a 512 MiB float32 array (about a SmolLM2-135M's weights), in
GB/s. Runs in its own process, like every benchmark, so it sees the same XLA threading as the steps.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.peers import common  # noqa: E402


def _median_seconds(fn, reps: int) -> float:
  fn()  # compile / warm the caches
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(sizes=(1024, 2048, 4096), reps: int = 8) -> dict[str, float]:
  """GFLOP/s of float32 square matmuls: {'jax_<n>': ..., 'numpy_<n>': ..., 'peak_gflops': best of all}."""
  if reps < 1 or not sizes:
    raise ValueError(f"measure needs reps >= 1 and at least one size, got reps={reps}, sizes={sizes}.")
  out = {}
  matmul = jax.jit(lambda a, b: a @ b)
  for n in sizes:
    rng = np.random.default_rng(n)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    flops = 2.0 * n ** 3
    t_jax = _median_seconds(lambda: matmul(a, b).block_until_ready(), reps)
    t_np = _median_seconds(lambda: a_np @ b_np, reps)
    out[f"jax_{n}"] = flops / t_jax / 1e9
    out[f"numpy_{n}"] = flops / t_np / 1e9
  out["peak_gflops"] = max(out.values())
  out["jax_peak_gflops"] = max(v for k, v in out.items() if k.startswith("jax_"))
  return {k: round(v, 2) for k, v in out.items()}


def read_bandwidth(mib: int = 512, reps: int = 8) -> dict[str, float]:
  """GB/s of summing a `mib` MiB float32 array: {'jax_read_gbs', 'numpy_read_gbs', 'read_gbs': the best}."""
  x_np = np.ones(mib * 2**20 // 4, np.float32)
  x = jnp.asarray(x_np)
  total = jax.jit(jnp.sum)
  out = {"jax_read_gbs": x_np.nbytes / _median_seconds(lambda: total(x).block_until_ready(), reps) / 1e9,
         "numpy_read_gbs": x_np.nbytes / _median_seconds(lambda: x_np.sum(), reps) / 1e9}
  out["read_gbs"] = max(out.values())
  return {k: round(v, 2) for k, v in out.items()}


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--reps", type=int, default=8)
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  result = {**measure(tuple(args.sizes), args.reps), **read_bandwidth(reps=args.reps)}
  wall = time.perf_counter() - t0
  spec = {"name": "machine"}
  common.emit(system="matmul", version=f"jax {jax.__version__}, numpy {np.__version__}", spec=spec, mode="peak",
              times_s=[wall, wall], tokens_per_step=0, extra=result)


if __name__ == "__main__":
  main(sys.argv[1:])
