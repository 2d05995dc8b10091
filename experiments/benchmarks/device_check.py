"""The prepared accelerator check (issue 17): the trainer's own GRPO / GARL step and sampler on Qwen3-0.6B shapes.

    python -m experiments.benchmarks.device_check --out DIR/device_check.json            # on a GPU / TPU machine
    python -m experiments.benchmarks.device_check --model tiny --steps 3 --out /tmp/dc.json  # the CPU smoke test

Random weights of the preset (`qwen3_0_6b`: 28 layers, D 1024, the real 151936-token vocabulary), the synthetic task's
prompts (their token ids are a handful of the vocabulary: only the shapes matter here). With 151936 tokens, random
weights almost never sample EOS or `</think>`, so budget forcing makes nearly every completion rationale_budget + 1
+ max_answer_len tokens and every step does about the same work (the JSON has the generated token count).

For each estimator (GRPO, GARL q = 0.75), with the paper configs' memory knobs (`--model-overrides`, default
"remat=full,scan_layers=true", and `--logprob-chunk 512`; without them the step did not fit the H200's default 103.65
GiB allocator pool), its rollouts decoding the layers unrolled (`rollout_unroll_layers`, as the paper configs;
`--scan-decode` to not):
- the trainer's jitted step through `train_and_evaluate` for `--steps` steps, timed by the trainer's own
  `perf/step_s`. The trainer fetches a step's metrics after the next step's rollout, so a middle step's interval is
  one update + one rollout; the first interval (`first_interval_s`) also holds the compiles and the second rollout,
  and the last one is the final update alone (`update_s`). `step_s` is the median of the middle intervals,
  `rollout_s` = step_s - update_s, `first_step_s` = first_interval_s - rollout_s (compile + warm-up + one step);
  tokens/s is generated tokens per step_s;
- MFU = the FLOPs the step executes (`flops.step_flops`'s 'total_shared', counted from the shapes: the trainer
  prefills and runs each prompt once per group) / step_s / the device's matmul peak (`--peak-tflops`, default: a
  measured bf16 8192^3 product on this device); `workload_tflops_per_step` is the count without that sharing.
  Model FLOPs: the forward that remat recomputes is not counted (MFU, not hardware FLOP utilisation);
- peak device memory (`memory_stats()['peak_bytes_in_use']`, where the backend reports it). A step that does not run
  records the allocator's pool with its error (`bytes_limit` is the pool XLA may use: XLA_PYTHON_CLIENT_MEM_FRACTION).
The part `grpo_unrolled` (last) is the GRPO step again with the layers unrolled (`--unrolled-overrides`, default
"remat=full,scan_layers=false"): scan against the unrolled loop at run time and at the first step on this device.
The sampler alone: the trainer's jitted rollout on one batch, median of `--sampler-reps` calls, tokens/s.
Attention (`attention_parity`, seconds): at the preset's head shapes in `--dtype`, with left padding (fully masked
query rows), each `attention_impl` ("einsum", "xla", and "cudnn" on a GPU) against a float32 einsum reference:
output and gradient max errors, finiteness, and the median time of forward + backward. A cuDNN failure is recorded
in the JSON, not raised. `--attention-impl` picks the implementation the trainer's steps use.
Everything goes into one JSON (and is printed), rewritten after each part: a part that fails records its error
there and the later parts still run (exit status 1), and a run stopped by a time limit keeps the parts it finished.
`peak_memory_bytes` is the process's peak so far (after each part), so a later part's includes the earlier ones'.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any


def matmul_peak_tflops(dtype: str, size: int = 8192, reps: int = 10) -> float:
  """Measured square-matmul rate of the default device (a device's peak, the MFU denominator)."""
  import jax
  import jax.numpy as jnp
  key = jax.random.key(0)
  a = jax.random.normal(key, (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), jnp.dtype(dtype))
  mm = jax.jit(lambda x, y: x @ y)
  for _ in range(3):
    mm(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * size ** 3 / statistics.median(times) / 1e12


def attention_parity(model: str, dtype: str, *, rows: int, length: int, reps: int = 5) -> dict[str, Any]:
  """Each attention implementation vs a float32 einsum reference (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tsallis_jax.model import ModelConfig, make_attention_mask
  from tsallis_jax.model.transformer import attend
  mcfg = getattr(ModelConfig, model)()
  h, k, e = mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim
  rng = np.random.default_rng(0)
  q32, k32, v32 = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                   for shape in ((rows, length, h, e), (rows, k, length, e), (rows, k, length, e)))
  pad_NxT = jnp.asarray(np.arange(length)[None] >= rng.integers(0, length // 2, (rows, 1)))  # left padding
  mask_NxTxT = make_attention_mask(pad_NxT)

  def value_and_grads(impl, q, kk, v):
    loss = lambda q, kk, v: jnp.sum(jnp.where(pad_NxT[:, :, None, None],
                                              attend(q, kk, v, mask_NxTxT, impl=impl).astype(jnp.float32), 0.0) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, kk, v)

  ref = jax.jit(lambda *a: value_and_grads("einsum", *a))(q32, k32, v32)
  impls = ["einsum", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
  out: dict[str, Any] = {"shape": [rows, length, h, k, e], "dtype": dtype}
  for impl in impls:
    try:
      fn = jax.jit(lambda *a, impl=impl: value_and_grads(impl, *a))
      args = tuple(x.astype(dtype) for x in (q32, k32, v32))
      got = jax.block_until_ready(fn(*args))
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
      leaves = lambda tree: [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
      rel = lambda a, b: float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
      out[impl] = {"finite": bool(all(np.isfinite(x).all() for x in leaves(got))),
                   "loss_rel_err": rel(*leaves((got[0], ref[0]))),
                   "grad_max_rel_err": max(rel(a, b) for a, b in zip(leaves(got[1]), leaves(ref[1]))),
                   "fwd_bwd_s": statistics.median(times)}
    except Exception as err:  # noqa: BLE001 -- a failing implementation is a result here
      out[impl] = {"error": f"{type(err).__name__}: {err}"[:500]}
  return out


# The train step's memory knobs, as the paper configs set them (experiments/configs/_paper.py). Without them the step
# did not fit the H200 (2026-11-30): unrolled layers with no remat asked XLA's GPU allocator for all of its default
# 103.65 GiB pool (CPU XLA's memory_analysis() of that step: 283 GiB; with remat=full under scan: 52 GiB,
# tests/test_benchmarks.py; on the H200 both forms with remat=full ran in 50 GB).
DEFAULT_MODEL_OVERRIDES = "remat=full,scan_layers=true"
# The part grpo_unrolled: the same GRPO step with the layers unrolled (issue 17: keep the unrolled form only if it is
# faster at run time on some device), run last so that a time limit cuts it first.
UNROLLED_MODEL_OVERRIDES = "remat=full,scan_layers=false"
PARTS = ("attention", "grpo", "garl", "sampler", "grpo_unrolled")


def check_config(model: str, estimator: str, steps: int, dtype: str, *, batch: int, samples: int, prompt_len: int,
                 rationale: int, answer: int, attention_impl: str = "auto", logprob_chunk: int = 512,
                 model_overrides: str = DEFAULT_MODEL_OVERRIDES, unroll_decode: bool = True):
  from tsallis_jax.train.config import TrainConfig
  overrides = "vocab_size=151936," if model == "qwen3_0_6b" else ""  # the real vocabulary, not the task's 90 words
  overrides += f"attention_impl={attention_impl}" + (f",{model_overrides}" if model_overrides else "")
  return TrainConfig(
      name=f"device_check_{estimator}", model=model, model_overrides=overrides, dtype=dtype, task="synthetic",
      task_options="p0=0.01,train=512,val=8,test=0",  # no test split: no evaluation after the timed steps
      max_prompt_len=prompt_len, rationale_budget=rationale,
      max_answer_len=answer, estimator=estimator, q=0.75, batch_size=batch, num_samples=samples, num_steps=steps,
      learning_rate=1e-6, eval_every=0, eval_num_samples=2, eval_batch_size=8, checkpoint_every=0, max_to_keep=1,
      progress_bar="off", tensorboard=False, log_ref_kl=False, logprob_chunk=logprob_chunk,
      rollout_unroll_layers=unroll_decode)


def peak_memory_bytes() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def allocator_stats() -> dict[str, int]:
  """The device allocator's pool: its limit (the memory fraction of the device), in use, largest block handed out."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return {k: stats[k] for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use", "largest_alloc_size")
          if k in stats}


def time_step(cfg, flops_per_step: float, peak_tflops: float) -> dict[str, Any]:
  """The trainer's step: first-step and median step time, tokens/s, MFU, peak memory."""
  from tsallis_jax.train import train_and_evaluate
  from tsallis_jax.train.writers import read_metrics
  error = None
  with tempfile.TemporaryDirectory() as workdir:
    try:
      train_and_evaluate(cfg, workdir)
    except Exception as err:  # noqa: BLE001 -- e.g. the final checkpoint's save: the timed steps still count
      error = f"{type(err).__name__}: {err}"[:500]
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [r for r in read_metrics(path) if "perf/step_s" in r] if os.path.exists(path) else []
  if not rows:  # with the allocator's pool, to tell a program too big from a pool already taken
    raise RuntimeError(f"no step finished: {error} | allocator: {allocator_stats()}")
  # The trainer fetches a step's metrics after the next step's rollout (loop.py), so `perf/step_s` of a middle step
  # is one update + one rollout (a whole step), the first also holds the compiles and a second rollout, and the last
  # (fetched straight after its dispatch: the run ends) is the final update alone.
  step_s = [r["perf/step_s"] for r in rows]
  middle = step_s[1:-1] or step_s[1:] or step_s
  median = statistics.median(middle)
  update = step_s[-1] if len(step_s) >= 3 else None
  tokens = statistics.median(r["gen/tokens"] for r in rows)
  return {"first_step_s": step_s[0] - (median - update) if update is not None else step_s[0],
          "first_interval_s": step_s[0], "step_s": median, "steps_timed": len(middle),
          **({"update_s": update, "rollout_s": median - update} if update is not None else {}),
          "generated_tokens_per_step": tokens, "tokens_per_s": tokens / median,
          "model_tflops_per_step": flops_per_step / 1e12,
          "mfu": flops_per_step / median / (peak_tflops * 1e12), "peak_memory_bytes": peak_memory_bytes(),
          **({"error_after_steps": error} if error else {})}


def time_sampler(cfg, reps: int) -> dict[str, Any]:
  """The trainer's jitted rollout alone on one batch of the task's prompts."""
  import jax
  import numpy as np

  from tsallis_jax.train import loop
  from tsallis_jax.train import evaluate as eval_lib
  s, pretrained = loop.setup(cfg)
  params = loop.initial_params(s, pretrained)
  records = s.task.train[:cfg.batch_size]
  tokens, mask = eval_lib.prompt_arrays(records, s.task.tokenizer, style=cfg.prompt_style,
                                        max_prompt_len=cfg.max_prompt_len, pad_id=s.ids.pad_id)
  key = jax.random.key(0)
  times = []
  for i in range(reps + 1):
    t = time.perf_counter()
    rollout = s.programs.train_rollout(params, tokens, mask, jax.random.fold_in(key, i))
    jax.block_until_ready(rollout.tokens_NxT)
    times.append(time.perf_counter() - t)
  median = statistics.median(times[1:])
  generated = int(np.asarray(rollout.lengths_N).sum())
  return {"first_call_s": times[0], "call_s": median, "rows": int(rollout.tokens_NxT.shape[0]),
          "generated_tokens": generated, "tokens_per_s": generated / median}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.device_check",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="the JSON file to write")
  parser.add_argument("--model", default="qwen3_0_6b", choices=("qwen3_0_6b", "smollm2_135m", "tiny"))
  parser.add_argument("--dtype", default="bfloat16", help="activation / compute dtype (params stay float32)")
  parser.add_argument("--steps", type=int, default=4, help="train steps per estimator (the first is compile)")
  parser.add_argument("--batch", type=int, default=8, help="prompts per step (B)")
  parser.add_argument("--samples", type=int, default=8, help="rollouts per prompt (G, the paper's M)")
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--rationale", type=int, default=512, help="rationale budget (the paper: 2k-4k minus 128)")
  parser.add_argument("--answer", type=int, default=16)
  parser.add_argument("--sampler-reps", type=int, default=3)
  parser.add_argument("--attention-impl", default="auto", help="ModelConfig.attention_impl of the timed steps")
  parser.add_argument("--attention-len", type=int, default=0, help="attention parity check length (0 = the "
                      "prompt length + rationale budget + answer, rounded up to even)")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak; 0 = measure a bf16 matmul")
  parser.add_argument("--logprob-chunk", type=int, default=512, help="TrainConfig.logprob_chunk of the steps (0 = "
                      "full N x T x V float32 logits: 24 GiB at 64 x 657 x 151936)")
  parser.add_argument("--model-overrides", default=DEFAULT_MODEL_OVERRIDES,
                      help="more ModelConfig overrides of the steps (k=v,...; '' = the preset's own: unrolled, "
                      "no remat)")
  parser.add_argument("--unrolled-overrides", default=UNROLLED_MODEL_OVERRIDES,
                      help="the ModelConfig overrides of the part grpo_unrolled (the same step, layers not under scan)")
  parser.add_argument("--scan-decode", action="store_true",
                      help="a scanned model's rollouts decode under the scan too (rollout_unroll_layers=False; "
                      "default: unrolled, as the paper configs)")
  parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run (comma-separated)")
  args = parser.parse_args(argv)

  import jax

  from experiments.benchmarks import flops
  from tsallis_jax.data import prompts, synthetic
  from tsallis_jax.model.build import preset_config
  from tsallis_jax.train.config import model_spec
  device = jax.devices()[0]
  peak = args.peak_tflops or matmul_peak_tflops(args.dtype if device.platform != "cpu" else "float32",
                                                size=8192 if device.platform != "cpu" else 1024, reps=5)
  out: dict[str, Any] = {"jax": jax.__version__, "device": str(device), "device_kind": device.device_kind,
                         "platform": device.platform, "model": args.model, "dtype": args.dtype,
                         "attention_impl": args.attention_impl,
                         "shapes": {"B": args.batch, "G": args.samples, "P": args.prompt_len,
                                    "rationale": args.rationale, "answer": args.answer},
                         "peak_tflops": peak, "peak_measured": not args.peak_tflops}
  failed = []

  def section(name: str, run) -> None:
    """One part of the check; a failure is recorded in the JSON and the later parts still run. The JSON is written
    after every part, so a run stopped by its time limit keeps what it measured. `part_s` (wall seconds of each
    part, compiles included) is what a device session's time limits are planned from."""
    start = time.perf_counter()
    try:
      out[name] = run()
    except Exception as err:  # noqa: BLE001 -- a failing part is a result here
      traceback.print_exc()
      out[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
      failed.append(name)
    out.setdefault("part_s", {})[name] = round(time.perf_counter() - start, 1)
    out["peak_memory_bytes"] = peak_memory_bytes()
    print(name, json.dumps(out[name]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)

  length = args.attention_len or 2 * (-(-(args.prompt_len + args.rationale + args.answer) // 2))
  parts = set(args.parts.split(","))
  if unknown := parts - set(PARTS):
    parser.error(f"--parts {sorted(unknown)} unknown; the parts are {', '.join(PARTS)}")
  out["logprob_chunk"], out["model_overrides"] = args.logprob_chunk, args.model_overrides
  out["rollout_unroll_layers"] = not args.scan_decode
  if "attention" in parts:
    section("attention", lambda: attention_parity(args.model, args.dtype, rows=args.batch, length=length))

  def config(estimator: str, steps: int, model_overrides: str):
    """The check's TrainConfig with this command line's shapes and knobs."""
    return check_config(args.model, estimator, steps, args.dtype, batch=args.batch, samples=args.samples,
                        prompt_len=args.prompt_len, rationale=args.rationale, answer=args.answer,
                        attention_impl=args.attention_impl, logprob_chunk=args.logprob_chunk,
                        model_overrides=model_overrides, unroll_decode=not args.scan_decode)

  def timed_step(estimator: str, model_overrides: str) -> dict[str, Any]:
    cfg = config(estimator, args.steps, model_overrides)
    tokenizer = synthetic.make_tokenizer()
    hf = preset_config(model_spec(cfg), vocab_size=len(tokenizer)).to_hf_config()
    counts = flops.step_flops(hf, num_sequences=args.batch * args.samples, prompt_len=args.prompt_len,
                              max_new=cfg.rollout_len(len(prompts.close_tag_ids(tokenizer))), beta=0.0,
                              num_prompts=args.batch)
    # The FLOPs the step executes (the trainer prefills each prompt once, and with `share_prompt_forward` runs its
    # forward and backward once per group): the workload's full count would overstate the MFU.
    executed = flops.executed_flops(counts, cfg.share_prompt_forward)
    return {**time_step(cfg, executed, peak), "workload_tflops_per_step": counts["total"] / 1e12,
            "model_overrides": model_overrides}

  for estimator in [e for e in ("grpo", "garl") if e in parts]:
    section(estimator, lambda estimator=estimator: timed_step(estimator, args.model_overrides))
  if "sampler" in parts:
    section("sampler", lambda: time_sampler(config("grpo", 1, args.model_overrides), args.sampler_reps))
  if "grpo_unrolled" in parts:  # last: the comparison that a short device session can best do without
    section("grpo_unrolled", lambda: timed_step("grpo", args.unrolled_overrides))
  print(json.dumps(out, indent=1))
  if failed:
    print(f"device_check: these parts failed: {failed} (their errors are in {args.out})", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
