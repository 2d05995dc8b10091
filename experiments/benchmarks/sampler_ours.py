"""Decode tokens/s of OUR sampler (`tsallis_jax.sampler`) on a benchmark workload; prints one BENCH_RESULT line.

  python -m experiments.benchmarks.sampler_ours --workload DIR [--steps N] [--threads 0|1]

DIR is a folder built by `python -m experiments.benchmarks.workloads OUT_ROOT` (`OUT_ROOT/tiny` is THE reference
workload of ../shared/bench, `OUT_ROOT/smollm2` the SmolLM2-135M one). The call measured is the one the peers'
runners time: `sample_batch` prompt strings in (the workload's prompts repeated), tokenised, left-padded to the
prompt bucket, sampled with temperature 1, no top-k/top-p, stop at `<eos>`, `max_new` new tokens, completions
decoded back to strings, `block_until_ready` on the tokens. Call 0 (compile) is reported apart, not in the median.

The headline (`times_s`, `tokens_per_s`) feeds the batch as `sample_batch` separate prompts with G = 1, exactly the
peers' input. `extra.grouped` times the same 64 sequences drawn the way the trainer draws them: the workload's
`num_prompts` distinct prompts, G = `sample_batch / num_prompts` samples each, one shared prefill per prompt.

`--threads 1` sets single-threaded XLA CPU (as the peers' t1 runs). Tokens/s counts `sample_batch * max_new` slots
per call, like the peers (a few rows stop early at `<eos>`; the loop stops only when all rows are done).
"""
from __future__ import annotations

import argparse
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

  def make(num_samples: int) -> sampler_lib.Sampler:
    config = sampler_lib.SamplingConfig(num_samples=num_samples, max_new_tokens=spec.max_new, temperature=1.0,
                                        stop_ids=(spec.eos_id,), pad_id=spec.pad_id)
    return sampler_lib.Sampler(model, tok, config)

  flat = [prompts[i % len(prompts)] for i in range(spec.sample_batch)]
  times, cpu_times, real = _time_calls(make(1), flat, steps)
  group = spec.sample_batch // len(prompts)
  grouped_times, grouped_cpu, _ = _time_calls(make(group), list(prompts), steps)
  grouped_median = float(np.median(grouped_times[1:]))
  slots = spec.sample_batch * spec.max_new
  return common.emit(
    system="tsallis_jax", version="0.1.0", spec=spec.to_json(), mode="sample", times_s=times, tokens_per_step=slots,
    sanity=_sanity_logits(model),
    extra={"sampler": "tsallis_jax.sampler.Sampler (prefill + lax.while_loop, KV cache)",
           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "real_tokens_last_call": real,
           "cpu_times_s": [round(t, 5) for t in cpu_times],
           "grouped": {"num_prompts": len(prompts), "group_size": group,
                       "times_s": [round(t, 5) for t in grouped_times], "median_s": round(grouped_median, 5),
                       "cpu_times_s": [round(t, 5) for t in grouped_cpu],
                       "tokens_per_s": round(slots / grouped_median, 1)}})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True, help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--steps", type=int, default=0, help="calls per run, call 0 excluded (0: the workload's)")
  p.add_argument("--threads", type=int, choices=(0, 1), default=0, help="1: single-threaded XLA CPU")
  args = p.parse_args(argv)
  run(args.workload, args.steps)


if __name__ == "__main__":
  main()
