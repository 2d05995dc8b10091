"""Profile note: the decode step's small-M matmuls on XLA CPU, by weight layout (prints one JSON line).

  python -m experiments.benchmarks.decode_gemm [--rows 16] [--reps 11]

A decode step multiplies M = batch rows (16 in the `smollm2` sampler workload) by every weight matrix once, so its
time is the weights' bytes over the rate the GEMM streams them. This times, interleaved, two SmolLM2-shaped chains:
a 30-layer MLP chain (D 576 -> F 1536 -> D, tanh between) and the tied LM head (V 49152 x D 576), each two ways:

* `x @ W`: activations MxK times weights stored KxN, the model's layout before weights moved to [out, in]
  (einsum "ntd,df->ntf");
* `linear`: `tsallis_jax.model.transformer.linear`, the model's projection now: weights stored NxK (Hugging Face's
  [out, in]); for 2 to `WEIGHT_LEFT_MAX_ROWS` rows on CPU it computes W @ x^T with the activations transposed behind
  optimisation barriers (without them XLA folds the transposes into the dot and falls back to a slow kernel).

and reports the weights' GB/s. M = 1 shows the machine's bandwidth (a matrix-vector product; `linear` takes the
plain einsum there).
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

from tsallis_jax.model.transformer import linear  # noqa: E402

D, F, LAYERS, V = 576, 1536, 30, 49152


@jax.jit
def _mlp_before(x_MxD, ups_DxF, downs_FxD):
  for up_DxF, down_FxD in zip(ups_DxF, downs_FxD):
    x_MxD = jnp.tanh(x_MxD @ up_DxF) @ down_FxD
  return x_MxD


@jax.jit
def _mlp_linear(x_MxD, ups_FxD, downs_DxF):
  for up_FxD, down_DxF in zip(ups_FxD, downs_DxF):
    x_MxD = linear(jnp.tanh(linear(x_MxD, up_FxD)), down_DxF)
  return x_MxD


@jax.jit
def _head_before(x_MxD, embed_VxD):
  return jnp.einsum("md,dv->mv", x_MxD, embed_VxD.T)


@jax.jit
def _head_linear(x_MxD, embed_VxD):
  return linear(x_MxD, embed_VxD)


def run(rows: int = 16, reps: int = 11) -> dict:
  keys = iter(jax.random.split(jax.random.key(0), 2 * LAYERS + 2))
  ups_DxF = [0.02 * jax.random.normal(next(keys), (D, F)) for _ in range(LAYERS)]
  downs_FxD = [0.02 * jax.random.normal(next(keys), (F, D)) for _ in range(LAYERS)]
  ups_FxD, downs_DxF = [w.T.copy() for w in ups_DxF], [w.T.copy() for w in downs_FxD]
  embed_VxD = 0.02 * jax.random.normal(next(keys), (V, D))
  x_MxD = jax.random.normal(next(keys), (rows, D))
  calls = {"mlp": {"x @ W": lambda: _mlp_before(x_MxD, ups_DxF, downs_FxD),
                   "linear": lambda: _mlp_linear(x_MxD, ups_FxD, downs_DxF)},
           "head": {"x @ W": lambda: _head_before(x_MxD, embed_VxD),
                    "linear": lambda: _head_linear(x_MxD, embed_VxD)}}
  weight_bytes = {"mlp": 2 * LAYERS * D * F * 4, "head": V * D * 4}
  result = {"profile": "decode GEMM by weight layout", "rows": rows, "mlp": {"layers": LAYERS, "shapes": [D, F]},
            "head": {"shapes": [V, D]}}
  for chain, pair in calls.items():
    np.testing.assert_allclose(pair["x @ W"](), pair["linear"](), rtol=1e-4, atol=1e-5)  # the same product
    times = {name: [] for name in pair}
    for _ in range(reps):
      for name, call in pair.items():
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    result[chain].update({"median_s": {k: round(v, 5) for k, v in med.items()},
                          "weight_gb_per_s": {k: round(weight_bytes[chain] / v / 1e9, 1) for k, v in med.items()},
                          "speedup_linear": round(med["x @ W"] / med["linear"], 3)})
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
