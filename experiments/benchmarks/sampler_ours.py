"""Decode tokens/s of OUR sampler (`tsallis_jax.sampler`) on a benchmark workload; prints one BENCH_RESULT line.

  python -m experiments.benchmarks.sampler_ours --workload DIR [--steps N] [--threads 0|1]
  python -m experiments.benchmarks.sampler_ours --profile-cache-layout

DIR is a folder built by `python -m experiments.benchmarks.workloads OUT_ROOT` (`OUT_ROOT/tiny` is THE reference
workload of ../shared/bench, `OUT_ROOT/smollm2` the SmolLM2-135M one). The call measured is the one the peers'
runners time: `sample_batch` prompt strings in (the workload's prompts repeated), tokenised, left-padded to the
prompt bucket, sampled with temperature 1, no top-k/top-p, stop at `<eos>`, `max_new` new tokens, completions
decoded back to strings, `block_until_ready` on the tokens. Call 0 (compile) is reported apart, not in the median.

The headline (`times_s`, `tokens_per_s`) feeds the batch as `sample_batch` separate prompt strings with G = 1,
exactly the peers' input, through the default `Sampler`, which prefills a prompt that repeats in the batch once
(`share_prefill`; the peers' batch is its prompts repeated). `extra.unshared` times the same call with
`share_prefill=False` (one prefill row per request, as the peers do), and `extra.grouped` the same 64 sequences drawn
the way the trainer draws them: the workload's `num_prompts` distinct prompts, G = `sample_batch / num_prompts`
samples each.

`--profile-cache-layout` instead prints a profile note (no workload needed): one decode step's attention core
(write the new k/v into the cache, scores, softmax, weighted values) inside a 32-step `fori_loop`, with the cache laid
out NxSxKxE (slot major, the layout before the model/sampler contract moved) and NxKxSxE (kv-head major, the contract
now), interleaved, at the tiny workload's shapes. With NxSxKxE, XLA CPU transposes the whole cache into a batch-major
layout for the batched dots at every step.

`--threads 1` sets single-threaded XLA CPU (as the peers' t1 runs). Tokens/s counts `sample_batch * max_new` slots
per call, like the peers (a few rows stop early at `<eos>`; the loop stops only when all rows are done).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":
  _args = sys.argv[1:]
  if "--threads" in _args and _args[_args.index("--threads") + 1] == "1":  # must precede the jax import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import workloads  # noqa: E402
from experiments.benchmarks.peers import common  # noqa: E402
from tsallis_jax import sampler as sampler_lib  # noqa: E402
from tsallis_jax.model import hf_io, make_attention_mask, make_positions  # noqa: E402


def _tokenizer(folder: str):
  from transformers import PreTrainedTokenizerFast  # word-level workload tokenizer: load the plain fast class
  tok = PreTrainedTokenizerFast.from_pretrained(folder)
  tok.padding_side = "left"
  return tok


def _sanity_logits(model) -> np.ndarray:
  ids_1xT = np.asarray([common.SANITY_IDS], np.int32)
  mask_1xT = np.ones_like(ids_1xT, bool)
  logits_1xTxV, _ = model(ids_1xT, make_positions(mask_1xT), make_attention_mask(mask_1xT))
  return np.asarray(logits_1xTxV[0, -1, :5])


def _time_calls(sampler: sampler_lib.Sampler, prompts: list[str], steps: int) -> tuple[list[float], list[float], int]:
  """Wall and process-CPU seconds of each call (CPU time is less sensitive to other processes on a shared box)."""
  times, cpu_times, real_tokens = [], [], 0
  for s in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    out = sampler(prompts, jax.random.key(s))
    jax.block_until_ready(out.rollout.tokens_NxT)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
    real_tokens = int(np.asarray(out.rollout.lengths_N).sum())
  return times, cpu_times, real_tokens


def run(workload: str, steps: int = 0) -> dict:
  spec = workloads.read_spec(workload)
  prompts, _ = workloads.read_prompts(workload)
  tok = _tokenizer(workload)
  model = hf_io.load_hf_checkpoint(workload)
  steps = steps or spec.sample_steps
  if steps < 2:
    raise ValueError(f"--steps={steps}: need at least 2 (call 0 is compile / warm-up and is excluded).")

  def make(num_samples: int, share_prefill: bool = True) -> sampler_lib.Sampler:
    config = sampler_lib.SamplingConfig(num_samples=num_samples, max_new_tokens=spec.max_new, temperature=1.0,
                                        stop_ids=(spec.eos_id,), pad_id=spec.pad_id)
    return sampler_lib.Sampler(model, tok, config, share_prefill=share_prefill)

  flat = [prompts[i % len(prompts)] for i in range(spec.sample_batch)]
  times, cpu_times, real = _time_calls(make(1), flat, steps)
  unshared_times, unshared_cpu, _ = _time_calls(make(1, share_prefill=False), flat, steps)
  group = spec.sample_batch // len(prompts)
  grouped_times, grouped_cpu, _ = _time_calls(make(group), list(prompts), steps)
  slots = spec.sample_batch * spec.max_new

  def variant(times_s, cpu_s, **info):
    median = float(np.median(times_s[1:]))
    return {**info, "times_s": [round(t, 5) for t in times_s], "median_s": round(median, 5),
            "cpu_times_s": [round(t, 5) for t in cpu_s], "tokens_per_s": round(slots / median, 1)}
  return common.emit(
    system="tsallis_jax", version="0.1.0", spec=spec.to_json(), mode="sample", times_s=times, tokens_per_step=slots,
    sanity=_sanity_logits(model),
    extra={"sampler": "tsallis_jax.sampler.Sampler (prefill + lax.while_loop, KV cache)",
           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "real_tokens_last_call": real,
           "cpu_times_s": [round(t, 5) for t in cpu_times],
           "unshared": variant(unshared_times, unshared_cpu, share_prefill=False),
           "grouped": variant(grouped_times, grouped_cpu, num_prompts=len(prompts), group_size=group)})


def profile_cache_layout(reps: int = 15, n: int = 64, s: int = 48, k: int = 4, e: int = 32, steps: int = 32) -> dict:
  """Median process-CPU seconds of the decode attention core over `steps` steps, per cache layout (see docstring)."""
  import jax.numpy as jnp

  def core(layout: str):
    kv_axis = 1 if layout == "NxSxKxE" else 2
    spec = "nke,nske->nks" if layout == "NxSxKxE" else "nke,nkse->nks"
    out_spec = "nks,nske->nke" if layout == "NxSxKxE" else "nks,nkse->nke"

    @jax.jit
    def run(q_NxKxE, k_buf, v_buf):
      def body(i, carry):
        q_NxKxE, k_buf, v_buf = carry
        new = jnp.expand_dims(q_NxKxE, kv_axis)
        k_buf = jax.lax.dynamic_update_slice_in_dim(k_buf, new, i, axis=kv_axis)
        v_buf = jax.lax.dynamic_update_slice_in_dim(v_buf, new, i, axis=kv_axis)
        probs_NxKxS = jax.nn.softmax(jnp.einsum(spec, q_NxKxE, k_buf) * e ** -0.5, axis=-1)
        return jnp.tanh(jnp.einsum(out_spec, probs_NxKxS, v_buf)), k_buf, v_buf
      return jax.lax.fori_loop(0, steps, body, (q_NxKxE, k_buf, v_buf))[0]
    shape = (n, s, k, e) if layout == "NxSxKxE" else (n, k, s, e)
    args = (jax.random.normal(jax.random.key(0), (n, k, e)), jnp.zeros(shape), jnp.zeros(shape))
    return run, args

  runs = {layout: core(layout) for layout in ("NxSxKxE", "NxKxSxE")}
  cpu = {layout: [] for layout in runs}
  for layout, (fn, args) in runs.items():
    jax.block_until_ready(fn(*args))
  for _ in range(reps):
    for layout, (fn, args) in runs.items():
      c0 = time.process_time()
      jax.block_until_ready(fn(*args))
      cpu[layout].append(time.process_time() - c0)
  med = {layout: float(np.median(v)) for layout, v in cpu.items()}
  result = {"profile": "decode attention core, cache layout", "shapes": {"N": n, "S": s, "K": k, "E": e},
            "steps": steps, "cpu_median_s": {l: round(v, 5) for l, v in med.items()},
            "ratio": round(med["NxSxKxE"] / med["NxKxSxE"], 2)}
  print(json.dumps(result), flush=True)
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--profile-cache-layout", action="store_true", help="print the cache-layout profile note instead")
  p.add_argument("--steps", type=int, default=0, help="calls per run, call 0 excluded (0: the workload's)")
  p.add_argument("--threads", type=int, choices=(0, 1), default=0, help="1: single-threaded XLA CPU")
  args = p.parse_args(argv)
  if args.profile_cache_layout:
    profile_cache_layout()
    return
  if not args.workload:
    p.error("--workload is required (or pass --profile-cache-layout)")
  run(args.workload, args.steps)


if __name__ == "__main__":
  main()
