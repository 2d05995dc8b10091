"""Profile note: the decode step's small-M matmuls on XLA CPU, by weight layout (prints one JSON line).

  python -m experiments.benchmarks.decode_gemm [--rows 16] [--reps 11]

A decode step multiplies M = batch rows (16 in the `smollm2` sampler workload) by every weight matrix once, so its
time is the weights' bytes over the rate the GEMM streams them. This times a 30-layer chain of SmolLM2-shaped MLP
matmuls (D 576 -> F 1536 -> D, tanh between) two ways, interleaved, and reports weight GB/s:

* `x @ W`: activations MxK times weights KxN, the model's layout (`tsallis_jax.model`, einsum "ntd,df->ntf");
* `W^T @ x^T`: the same product with the weights stored NxK (Hugging Face's [out, in]) as the LEFT operand and the
  activations carried feature-major (KxM).

It is the evidence behind the sampler's remaining gap on `smollm2` (see the benchmarks README): at M = 16 XLA CPU's
GEMM reads weights at about half of this machine's bandwidth (M = 1 shows the bandwidth), and the second layout is
the cheapest known gain, a model-wide layout change that has not been made.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

D, F, LAYERS = 576, 1536, 30


def _chains():
  @jax.jit
  def model_layout(x_MxD, ups_DxF, downs_FxD):
    for up_DxF, down_FxD in zip(ups_DxF, downs_FxD):
      x_MxD = jnp.tanh(x_MxD @ up_DxF) @ down_FxD
    return x_MxD

  @jax.jit
  def weights_left(x_MxD, ups_FxD, downs_DxF):
    x_DxM = x_MxD.T
    for up_FxD, down_DxF in zip(ups_FxD, downs_DxF):
      x_DxM = down_DxF @ jnp.tanh(up_FxD @ x_DxM)
    return x_DxM.T

  return model_layout, weights_left


def run(rows: int = 16, reps: int = 11) -> dict:
  keys = iter(jax.random.split(jax.random.key(0), 2 * LAYERS + 1))
  ups_DxF = [0.02 * jax.random.normal(next(keys), (D, F)) for _ in range(LAYERS)]
  downs_FxD = [0.02 * jax.random.normal(next(keys), (F, D)) for _ in range(LAYERS)]
  ups_FxD, downs_DxF = [w.T.copy() for w in ups_DxF], [w.T.copy() for w in downs_FxD]
  x_MxD = jax.random.normal(next(keys), (rows, D))
  model_layout, weights_left = _chains()
  calls = {"x @ W": lambda: model_layout(x_MxD, ups_DxF, downs_FxD),
           "W^T @ x^T": lambda: weights_left(x_MxD, ups_FxD, downs_DxF)}
  np.testing.assert_allclose(calls["x @ W"](), calls["W^T @ x^T"](), rtol=1e-4, atol=1e-5)  # the same product
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  weight_bytes = 2 * LAYERS * D * F * 4
  med = {name: float(np.median(ts)) for name, ts in times.items()}
  result = {"profile": "decode GEMM by weight layout", "rows": rows, "layers": LAYERS, "shapes": [D, F],
            "median_s": {k: round(v, 5) for k, v in med.items()},
            "weight_gb_per_s": {k: round(weight_bytes / v / 1e9, 1) for k, v in med.items()},
            "speedup_weights_left": round(med["x @ W"] / med["W^T @ x^T"], 3)}
  print(json.dumps(result), flush=True)
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=16, help="M, the decode batch rows")
  p.add_argument("--reps", type=int, default=11)
  args = p.parse_args(argv)
  run(args.rows, args.reps)


if __name__ == "__main__":
  main()
