"""Profile note: the model's attention on XLA CPU, einsum vs `jax.nn.dot_product_attention` (prints one JSON line).

  python -m experiments.benchmarks.attention_impl [--reps 21] [--layers 30] [--out FILE.json]

The measurement behind `ModelConfig.attention_impl`'s default (`transformer.attend`): the einsum path would stay the
CPU default only if it paid for itself here. At SmolLM2-135M's widths (9 query / 3 kv heads of 64, D 576, V 49152, float32) it times, interleaved in one process (A, B, A, B, ...),
median of `--reps` calls each:

* `train`: forward + backward of the model (`--layers` layers) on 8 left-padded rows of 48 tokens, the summed
  log-prob of the tokens as loss (the train step's shape of work);
* `decode`: one cached decode step of the model at 16 rows over a 48-slot cache (the sampler's inner loop);
* `attn_train` / `attn_decode`: the attention kernel alone (`transformer.attend`) at the same shapes (forward +
  backward; one query over 48 slots), summed over `--layers` calls so its share of the model step shows.

`ratio` = xla time / einsum time (> 1: einsum is faster). Both paths are first checked to give the same result.
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
from flax import nnx  # noqa: E402

from tsallis_jax.model import ModelConfig, Transformer, init_cache, make_attention_mask, make_positions  # noqa: E402
from tsallis_jax.model.logprobs import token_logprobs  # noqa: E402
from tsallis_jax.model.transformer import attend  # noqa: E402

IMPLS = ("einsum", "xla")


def _model_calls(impl: str, layers: int, params, rows_train: int, len_train: int, rows_decode: int, slots: int):
  cfg = ModelConfig.smollm2_135m(num_layers=layers, attention_impl=impl)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  tokens_NxT = jnp.asarray(rng.integers(3, cfg.vocab_size, (rows_train, len_train)), jnp.int32)
  pad_NxT = jnp.asarray(np.arange(len_train)[None] >= rng.integers(0, 12, (rows_train, 1)))  # left padding

  @jax.jit
  def train(params):
    def loss(p):
      logits_NxTxV, _ = nnx.merge(graphdef, p)(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))
      return -jnp.sum(jnp.where(pad_NxT, token_logprobs(logits_NxTxV, tokens_NxT), 0.0))
    return jax.grad(loss)(params)

  cache = init_cache(cfg, batch_size=rows_decode, max_len=slots, dtype=jnp.float32)
  cache = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), cache)
  index = slots // 2
  slot_mask_Nx1xS = jnp.asarray(np.arange(slots)[None, None] <= index) & jnp.asarray(
      np.arange(slots)[None, None] >= rng.integers(0, 8, (rows_decode, 1, 1)))
  token_Nx1 = jnp.asarray(rng.integers(3, cfg.vocab_size, (rows_decode, 1)), jnp.int32)
  position_Nx1 = jnp.full((rows_decode, 1), index, jnp.int32)

  @jax.jit
  def decode(params, cache):
    logits, new_cache = nnx.merge(graphdef, params)(token_Nx1, position_Nx1, slot_mask_Nx1xS, cache=cache,
                                                    cache_index=index)
    return logits, new_cache

  return {"train": lambda: train(params), "decode": lambda: decode(params, cache)}


def _attention_calls(impl: str, layers: int, rows_train: int, len_train: int, rows_decode: int, slots: int):
  cfg = ModelConfig.smollm2_135m()
  h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q_LxNxTxHxE, k_LxNxKxTxE, v_LxNxKxTxE = (normal(layers, rows_train, len_train, h, e),
                                           normal(layers, rows_train, k, len_train, e),
                                           normal(layers, rows_train, k, len_train, e))
  pad_NxT = jnp.asarray(np.arange(len_train)[None] >= rng.integers(0, 12, (rows_train, 1)))
  mask_NxTxT = make_attention_mask(pad_NxT)
  qd_LxNx1xHxE, kd_LxNxKxSxE, vd_LxNxKxSxE = (normal(layers, rows_decode, 1, h, e),
                                              normal(layers, rows_decode, k, slots, e),
                                              normal(layers, rows_decode, k, slots, e))
  mask_Nx1xS = jnp.asarray(np.arange(slots)[None, None] >= rng.integers(0, 8, (rows_decode, 1, 1)))

  @jax.jit
  def attn_train(q, kk, v):
    loss = lambda q, kk, v: sum(jnp.sum(jnp.sin(attend(q[i], kk[i], v[i], mask_NxTxT, impl=impl)))
                                for i in range(layers))
    return jax.grad(loss, argnums=(0, 1, 2))(q, kk, v)

  @jax.jit
  def attn_decode(q, kk, v):
    return [attend(q[i], kk[i], v[i], mask_Nx1xS, impl=impl) for i in range(layers)]

  return {"attn_train": lambda: attn_train(q_LxNxTxHxE, k_LxNxKxTxE, v_LxNxKxTxE),
          "attn_decode": lambda: attn_decode(qd_LxNx1xHxE, kd_LxNxKxSxE, vd_LxNxKxSxE)}


def run(reps: int = 21, layers: int = 30, rows_train: int = 8, len_train: int = 48, rows_decode: int = 16,
        slots: int = 48) -> dict:
  cfg = ModelConfig.smollm2_135m(num_layers=layers)
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
  calls = {impl: {**_model_calls(impl, layers, params, rows_train, len_train, rows_decode, slots),
                  **_attention_calls(impl, layers, rows_train, len_train, rows_decode, slots)} for impl in IMPLS}
  result = {"profile": "attention implementation on XLA CPU", "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "load_avg_1min_start": round(os.getloadavg()[0], 2), "jax": jax.__version__, "layers": layers, "reps": reps,
            "shapes": {"train": [rows_train, len_train], "decode": [rows_decode, slots],
                       "heads": [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]}}
  for name in calls[IMPLS[0]]:
    outs = [jax.block_until_ready(calls[impl][name]()) for impl in IMPLS]  # compile, and the same result
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                         rtol=2e-3, atol=2e-3), outs[0], outs[1])
    times = {impl: [] for impl in IMPLS}
    for _ in range(reps):
      for impl in IMPLS:
        t0 = time.perf_counter()
        jax.block_until_ready(calls[impl][name]())
        times[impl].append(time.perf_counter() - t0)
    med = {impl: float(np.median(ts)) for impl, ts in times.items()}
    result[name] = {"median_s": {k: round(v, 5) for k, v in med.items()},
                    "ratio_xla_over_einsum": round(med["xla"] / med["einsum"], 3)}
    print(json.dumps({name: result[name]}), flush=True)
  result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
  print(json.dumps(result), flush=True)
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=21)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args(argv)
  result = run(args.reps, args.layers)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
