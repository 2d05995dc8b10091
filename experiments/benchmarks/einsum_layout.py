"""Profile note: on XLA CPU, a SwiGLU MLP's backward is slower with 3-D einsums than with the rows flattened to 2-D.

  python -m experiments.benchmarks.einsum_layout [--reps 15]

The model (`tsallis_jax/model/transformer.py`) writes its projections as rank-3 einsums (`ntd,df->ntf`). Their weight
gradients contract over two dimensions (n, t); XLA CPU lowers that as a transpose plus a dot outside its fast
library-fusion path, while the same MLP on `x.reshape(-1, D)` stays on it. This script times forward + backward (grads
of the three weights) of the two layouts interleaved, at the benchmark workloads' shapes, and prints the ratio.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

SHAPES = {"tiny": (64, 48, 128, 512), "smollm2": (8, 48, 576, 1536)}  # N, S, D, F of one policy forward


def mlp_rank3(w, x_NxSxD):
  gate_DxF, up_DxF, down_FxD = w
  h_NxSxF = jax.nn.silu(jnp.einsum("nsd,df->nsf", x_NxSxD, gate_DxF)) * jnp.einsum("nsd,df->nsf", x_NxSxD, up_DxF)
  return jnp.sum(jnp.einsum("nsf,fd->nsd", h_NxSxF, down_FxD) ** 2)


def mlp_rank2(w, x_NxSxD):
  gate_DxF, up_DxF, down_FxD = w
  x_MxD = x_NxSxD.reshape(-1, x_NxSxD.shape[-1])
  return jnp.sum(((jax.nn.silu(x_MxD @ gate_DxF) * (x_MxD @ up_DxF)) @ down_FxD) ** 2)


def compare(n: int, s: int, d: int, f: int, reps: int = 15) -> dict[str, float]:
  """Median seconds of jitted grad (w.r.t. the weights) for both layouts, interleaved; and their ratio."""
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (n, s, d))
  w = (jax.random.normal(k[1], (d, f)), jax.random.normal(k[2], (d, f)), jax.random.normal(k[3], (f, d)))
  fns = {"rank3": jax.jit(jax.grad(mlp_rank3)), "rank2": jax.jit(jax.grad(mlp_rank2))}
  for fn in fns.values():
    jax.block_until_ready(fn(w, x))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(w, x))
      times[name].append(time.perf_counter() - t0)
  out = {name: statistics.median(v) for name, v in times.items()}
  out["ratio"] = out["rank3"] / out["rank2"]
  return out


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser()
  p.add_argument("--reps", type=int, default=15)
  args = p.parse_args(argv)
  for name, shape in SHAPES.items():
    r = compare(*shape, reps=args.reps)
    print(f"{name} N,S,D,F={shape}: MLP fwd+bwd rank-3 einsums {1e3 * r['rank3']:.1f} ms, rows flattened "
          f"{1e3 * r['rank2']:.1f} ms, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
  main(sys.argv[1:])
