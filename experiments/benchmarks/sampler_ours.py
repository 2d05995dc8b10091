"""Decode tokens/s of OUR sampler (`tsallis_jax.sampler`) on a benchmark workload; prints one BENCH_RESULT line.

  python -m experiments.benchmarks.sampler_ours --workload DIR [--steps N] [--threads 0|1]
                                               [--scan-layers] [--cpu-emitters auto|xla|quick_compile]
  python -m experiments.benchmarks.sampler_ours --emitters-ab --workload DIR [--rounds 3] [--out OUT]
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

`--scan-layers` loads the model with its layers under one scan (`ModelConfig.scan_layers`) and `--cpu-emitters` sets
`Sampler(cpu_emitters=...)` (`tsallis_jax.xla_cpu`; default "xla"). `--emitters-ab` is the A/B of the latter on the
scanned model: each round runs this benchmark (`--steps 4`) once per choice, "auto" and "xla", alternating, each in a
fresh process with no persistent compilation cache; it writes OUT.json and OUT.md: per choice and sampler variant the
median over rounds of call 0 (compile + first call) and of the warm median.

`--threads 1` sets single-threaded XLA CPU (as the peers' t1 runs). Tokens/s counts `sample_batch * max_new` slots
per call, like the peers (a few rows stop early at `<eos>`; the loop stops only when all rows are done).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
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
from tsallis_jax import xla_cpu  # noqa: E402
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


def run(workload: str, steps: int = 0, scan_layers: bool = False, cpu_emitters: str = "xla") -> dict:
  spec = workloads.read_spec(workload)
  prompts, _ = workloads.read_prompts(workload)
  tok = _tokenizer(workload)
  model = hf_io.load_hf_checkpoint(workload, **({"scan_layers": True} if scan_layers else {}))
  steps = steps or spec.sample_steps
  if steps < 2:
    raise ValueError(f"--steps={steps}: need at least 2 (call 0 is compile / warm-up and is excluded).")

  def make(num_samples: int, share_prefill: bool = True) -> sampler_lib.Sampler:
    config = sampler_lib.SamplingConfig(num_samples=num_samples, max_new_tokens=spec.max_new, temperature=1.0,
                                        stop_ids=(spec.eos_id,), pad_id=spec.pad_id)
    return sampler_lib.Sampler(model, tok, config, share_prefill=share_prefill, cpu_emitters=cpu_emitters)

  flat = [prompts[i % len(prompts)] for i in range(spec.sample_batch)]
  headline = make(1)
  times, cpu_times, real = _time_calls(headline, flat, steps)
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
           "scan_layers": scan_layers, "cpu_emitters": cpu_emitters,
           "compiler_options": headline.compiler_options(),
           "cpu_times_s": [round(t, 5) for t in cpu_times],
           "unshared": variant(unshared_times, unshared_cpu, share_prefill=False),
           "grouped": variant(grouped_times, grouped_cpu, num_prompts=len(prompts), group_size=group)})


AB_CHOICES = ("auto", "xla")
AB_VARIANTS = {"G=1, shared prefill": lambda r: r, "G=1, share_prefill=False": lambda r: r["extra"]["unshared"],
               "prompts x G": lambda r: r["extra"]["grouped"]}
AB_TIMEOUT_S = 1200


def emitters_ab(workload: str, rounds: int, out: str, quiet_wait: float) -> list[dict]:
  """The `--emitters-ab` A/B (module docstring); returns every run."""
  from experiments.benchmarks import run as run_lib
  command = f"python -m experiments.benchmarks.sampler_ours --emitters-ab --workload {workload} --rounds {rounds}"
  runs = []

  def save_partial():  # a failed child: keep the runs before it
    if runs:
      _write_ab(pathlib.Path(out), runs, command + "  (stopped early: a run failed)")

  for r in range(rounds):
    for choice in AB_CHOICES[r % 2:] + AB_CHOICES[:r % 2]:
      cmd = [sys.executable, "-m", "experiments.benchmarks.sampler_ours", "--workload", workload, "--steps", "4",
             "--scan-layers", "--cpu-emitters", choice]
      result, load = run_lib.quiet_child_json(cmd, common.RESULT_PREFIX.strip(), AB_TIMEOUT_S, quiet_wait,
                                              failed=f"sampler_ours child failed ({choice}, round {r}; the runs "
                                                     f"before it are in {out}.json)", save_partial=save_partial)
      row = {"choice": choice, "round": r, "load_before": load,
             "compiler_options": result["extra"]["compiler_options"]}
      for name, pick in AB_VARIANTS.items():
        v = pick(result)
        row[name] = {"call0_s": v["times_s"][0], "warm_s": statistics.median(v["times_s"][1:])}
      runs.append(row)
      print(f"round {r} {choice}: " + ", ".join(f"{n} call 0 {row[n]['call0_s']:.3f} s, warm {row[n]['warm_s']:.4f} s"
                                                for n in AB_VARIANTS), flush=True)
  _write_ab(pathlib.Path(out), runs, command)
  return runs


def _write_ab(out: pathlib.Path, runs: list[dict], command: str) -> None:
  from experiments.benchmarks import run as run_lib
  m = run_lib.machine()
  lines = ["# The Sampler's XLA:CPU emitters on a scanned model (`Sampler(cpu_emitters=...)`)", "",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
           f"{run_lib.git_commit()}; machine: {m['cpu']}, {m['cores']} cores",
           f"- command: `{command}`",
           "- seconds, median over rounds (range); call 0 = compile + first call (each variant is its own prompt "
           "shape, so its own compile); warm = the median of calls 1-3; fresh process per run, no persistent "
           "compilation cache", "",
           "| sampler call | auto: call 0 | xla: call 0 | auto / xla | auto: warm | xla: warm | auto / xla |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  summary = {}
  every_choice_ran = all(any(r["choice"] == c for r in runs) for c in AB_CHOICES)  # not so when stopped early
  if not every_choice_ran:
    lines.append("| (no ratio: not every choice ran; the runs are in the .json) | | | | | | |")
  for name in (AB_VARIANTS if every_choice_ran else ()):
    med = {}
    for choice in AB_CHOICES:
      for key in ("call0_s", "warm_s"):
        vals = [r[name][key] for r in runs if r["choice"] == choice]
        med[(choice, key)] = (statistics.median(vals), min(vals), max(vals))
    cell = lambda v: f"{v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})"  # noqa: E731
    ratio = {key: med[("auto", key)][0] / med[("xla", key)][0] for key in ("call0_s", "warm_s")}
    summary[name] = {"auto_call0_s": med[("auto", "call0_s")][0], "xla_call0_s": med[("xla", "call0_s")][0],
                     "auto_warm_s": med[("auto", "warm_s")][0], "xla_warm_s": med[("xla", "warm_s")][0],
                     "call0_ratio": ratio["call0_s"], "warm_ratio": ratio["warm_s"]}
    lines.append(f"| {name} | {cell(med[('auto', 'call0_s')])} | {cell(med[('xla', 'call0_s')])} | "
                 f"{ratio['call0_s']:.3f} | {cell(med[('auto', 'warm_s')])} | {cell(med[('xla', 'warm_s')])} | "
                 f"{ratio['warm_s']:.3f} |")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  out.with_suffix(".json").write_text(json.dumps({"command": command, "summary": summary, "runs": runs}, indent=1))


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
  p.add_argument("--scan-layers", action="store_true", help="the model's layers under one scan")
  p.add_argument("--cpu-emitters", choices=xla_cpu.CPU_EMITTERS, default="xla",
                 help="Sampler(cpu_emitters=...), tsallis_jax.xla_cpu")
  p.add_argument("--emitters-ab", action="store_true", help="the A/B of --cpu-emitters auto / xla, scanned model")
  p.add_argument("--rounds", type=int, default=3, help="--emitters-ab rounds")
  p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "sampler_emitters"),
                 help="--emitters-ab writes OUT.json and OUT.md")
  p.add_argument("--quiet-wait", type=float, default=45.0, help="--emitters-ab: wait up to this for a quiet machine")
  args = p.parse_args(argv)
  if args.profile_cache_layout:
    profile_cache_layout()
    return
  if not args.workload:
    p.error("--workload is required (or pass --profile-cache-layout)")
  if args.emitters_ab:
    emitters_ab(args.workload, args.rounds, args.out, args.quiet_wait)
    return
  run(args.workload, args.steps, args.scan_layers, args.cpu_emitters)


if __name__ == "__main__":
  main()
