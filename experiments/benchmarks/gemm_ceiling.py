"""The train step's matmuls one by one: the update FLOP rate the step could reach if every matmul ran at the rate
XLA's CPU GEMM gets for that shape alone (issue 17's "update phase FLOP rate >= 80% of the matmul peak").

  python -m experiments.benchmarks.gemm_ceiling --workload DIR [--mode grpo] [--reps 7] [--out results/gemm_ceiling]

1. Builds the benchmark's train step (`ours_grpo.build`: the trainer's jitted step, reference forward, policy
   forward + backward, AdamW) and reads every `dot_general` of its jaxpr, the backward included (a scan's body
   counts `length` times; the benchmark's step has no other loop around a matmul, and one there is an error).
2. Times each distinct matmul (shapes, dimension numbers, dtypes) alone, jitted, over enough distinct operand copies
   that they do not all sit in cache, and takes the median per product.
3. Times the step's optimizer alone: the same optax transformation (global-norm clip, AdamW, schedule) applied to
   gradients of the parameters' shapes, with the parameter update and the norms the step logs, jitted with the
   step's donation. It reads the parameters, gradients and both moments and writes three of them back, so it is
   bound by memory bandwidth, not by FLOPs.
4. In the same process, measures the float32 matmul peak (`matmul_peak.measure`, square 1024 / 2048) and the step
   itself (median of warm steps on one rollout).

The GEMM ceiling is the sum over the step's matmuls of their standalone times: the step cannot be faster than that
while XLA runs its matmuls at those rates, whatever is done about the rest (optimizer, copies, softmax). The report
gives the step's matmul FLOPs at the ceiling as a fraction of the peak: the most the update FLOP-rate ratio can be.
Adding the optimizer's standalone time gives a tighter bound (the optimizer cannot start before the last gradient
exists, and on CPU the two do not overlap): the matmul FLOPs over (ceiling + optimizer), as a fraction of the peak.
Writes `OUT.json` and `OUT.md`.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks import matmul_peak, ours_grpo  # noqa: E402
from tsallis_jax import host_memory  # noqa: E402
from tsallis_jax.train.schedules import make_optimizer  # noqa: E402
from tsallis_jax.train.step import optimizer_update  # noqa: E402

#: Operand bytes a timed batch of copies spans at least (larger than this machine's last-level cache).
SPAN_BYTES = 96 * 2**20
MAX_COPIES = 64


def matmuls(jaxpr: jax.extend.core.Jaxpr, times: int = 1) -> Iterator[tuple[tuple, int]]:
  """(key, executions per call) of every dot_general in `jaxpr` and the jaxprs it calls; key = (lhs shape, rhs
  shape, dimension numbers, lhs dtype, rhs dtype, preferred dtype)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars)
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
      pet = eqn.params.get("preferred_element_type")
      yield (tuple(lhs.shape), tuple(rhs.shape), dims, str(lhs.dtype), str(rhs.dtype),
             str(pet) if pet is not None else None), times
      continue
    name = eqn.primitive.name
    inner = times * eqn.params["length"] if name == "scan" else times
    for sub in _sub_jaxprs(eqn.params):
      found = list(matmuls(sub, inner))
      if found and name in ("while", "cond"):
        raise ValueError(f"a matmul inside `{name}`: its execution count is not static; gemm_ceiling counts only "
                         "unrolled code and scans")
      yield from found


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[jax.extend.core.Jaxpr]:
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def flops(key: tuple) -> float:
  """2 x output elements x contraction length of one product."""
  lhs, rhs, ((lc, rc), (lb, rb)), *_ = key
  contract = math.prod(lhs[i] for i in lc)
  batch = math.prod(lhs[i] for i in lb)
  lhs_free = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
  rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
  return 2.0 * batch * lhs_free * rhs_free * contract


def time_matmul(key: tuple, reps: int) -> float:
  """Median seconds of one product, jitted alone, over copies of its operands spanning `SPAN_BYTES`."""
  lhs, rhs, dims, lhs_dtype, rhs_dtype, pet = key
  nbytes = (math.prod(lhs) * jnp.dtype(lhs_dtype).itemsize + math.prod(rhs) * jnp.dtype(rhs_dtype).itemsize)
  copies = max(1, min(MAX_COPIES, -(-SPAN_BYTES // nbytes)))
  keys = jax.random.split(jax.random.key(len(lhs) + len(rhs)), 2 * copies)
  lhs_list = [jax.random.normal(k, lhs, jnp.float32).astype(lhs_dtype) for k in keys[:copies]]
  rhs_list = [jax.random.normal(k, rhs, jnp.float32).astype(rhs_dtype) for k in keys[copies:]]
  fn = jax.jit(lambda ls, rs: [jax.lax.dot_general(a, b, dims, preferred_element_type=pet)
                               for a, b in zip(ls, rs)])
  jax.block_until_ready(fn(lhs_list, rhs_list))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(lhs_list, rhs_list))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / copies


def step_seconds(built: ours_grpo.Built, steps: int) -> float:
  """Median of `steps` warm train steps (the update phase alone) on one rollout with random 0/1 rewards."""
  spec = built.spec
  rollout = built.rollout_fn(built.state.params, *built.prompts, jax.random.key(1))
  rewards = jnp.asarray(np.random.default_rng(0).random((spec.num_prompts, spec.group_size)) > 0.5, jnp.float32)
  batch = {"rollout": rollout, **built.answers, "rewards_BxG": rewards}
  q_range = jnp.asarray([built.cfg.q, built.cfg.q], jnp.float32)
  state, times = built.state, []
  for i in range(steps + 2):
    t0 = time.perf_counter()
    state, _ = built.train_step(state, batch, jax.random.key(2), q_range)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t0)
  return statistics.median(times[2:])


def optimizer_seconds(built: ours_grpo.Built, steps: int) -> float:
  """Median of `steps` warm calls of the step's optimizer alone (`step.optimizer_update`: the optax update, applied,
  and the norms the step logs) on random gradients of the parameters' shapes; parameters and optimizer state
  donated, as in the step."""
  tx = make_optimizer(built.cfg)
  fn = jax.jit(lambda params, opt_state, grads: optimizer_update(built.cfg, tx, grads, opt_state, params),
               donate_argnums=(0, 1))
  leaves, treedef = jax.tree.flatten(built.state.params)
  keys = jax.random.split(jax.random.key(3), 2 * len(leaves))

  def random_like(scale, keys):
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  params, grads = random_like(0.02, keys[:len(leaves)]), random_like(1e-3, keys[len(leaves):])
  opt_state = tx.init(params)
  times = []
  for _ in range(steps + 2):
    t0 = time.perf_counter()
    params, opt_state, *_ = fn(params, opt_state, grads)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
  return statistics.median(times[2:])


def run(workload: str, mode: str = "grpo", reps: int = 7, steps: int = 5) -> dict[str, Any]:
  built = ours_grpo.build(workload, mode)
  q_range = jnp.asarray([built.cfg.q, built.cfg.q], jnp.float32)
  jaxpr = jax.make_jaxpr(built.train_step.jitted)(built.state, built.abstract_batch, jax.random.key(0), q_range)
  counts: dict[tuple, int] = collections.Counter()
  for key, n in matmuls(jaxpr.jaxpr):
    counts[key] += n
  optimizer_s = optimizer_seconds(built, steps)
  update_s = step_seconds(built, steps)  # donates built.state
  del built
  peak = matmul_peak.measure(sizes=(1024, 2048), reps=reps)["peak_gflops"]
  seconds = {key: time_matmul(key, reps) for key in counts}
  # Sums over the unrounded times and FLOPs; only the stored values are rounded (to significant digits, since a
  # small workload's products take microseconds).
  total_gflop = sum(n * flops(key) for key, n in counts.items()) / 1e9
  ceiling_s = sum(n * seconds[key] for key, n in counts.items())
  rows = [{"lhs": list(key[0]), "rhs": list(key[1]), "dims": key[2], "dtype": key[3], "count": n,
           "gflop": _sig(n * flops(key) / 1e9), "ms_each": _sig(seconds[key] * 1e3),
           "gflops": round(flops(key) / seconds[key] / 1e9, 1)}
          for key, n in sorted(counts.items(), key=lambda kn: -kn[1] * seconds[kn[0]])]
  result = {"workload": os.path.basename(os.path.normpath(workload)), "mode": mode, "peak_gflops": peak,
            "matmul_gflop": _sig(total_gflop), "gemm_ceiling_s": _sig(ceiling_s),
            "ceiling_fraction_of_peak": round(total_gflop / ceiling_s / peak, 3),
            "update_s": _sig(update_s), "update_fraction_of_peak": round(total_gflop / update_s / peak, 3),
            "update_over_ceiling": round(update_s / ceiling_s, 3), "optimizer_s": _sig(optimizer_s),
            "bound_fraction_of_peak": round(total_gflop / (ceiling_s + optimizer_s) / peak, 3), "matmuls": rows,
            "command": "python -m experiments.benchmarks.gemm_ceiling --workload " + workload + f" --mode {mode}",
            "jax": jax.__version__}
  return result


def _sig(x: float, digits: int = 5) -> float:
  return float(f"{x:.{digits}g}")


def render(result: dict[str, Any], top: int = 12) -> str:
  r = result
  lines = [f"# The `{r['workload']}` train step's matmuls, each timed alone ({r['mode']})", "",
           f"- command: `{r['command']}` (jax {r['jax']})",
           f"- float32 matmul peak, same process: {r['peak_gflops']} GFLOP/s (square 1024 / 2048)",
           f"- the step's matmuls (jaxpr, backward included): {r['matmul_gflop']} GFLOP in "
           f"{sum(m['count'] for m in r['matmuls'])} products of {len(r['matmuls'])} shapes",
           f"- **GEMM ceiling** (each product at its standalone rate, summed): {r['gemm_ceiling_s']} s = "
           f"**{r['ceiling_fraction_of_peak']:.0%} of the peak**: the most the update FLOP rate can be with these "
           "GEMMs",
           f"- the step measured in the same process: {r['update_s']} s = {r['update_fraction_of_peak']:.0%} of the "
           f"peak, {r['update_over_ceiling']}x the ceiling (the rest: optimizer, softmax, copies, dispatch)"]
  if "optimizer_s" in r:  # results written before the optimizer was timed lack it
    lines.append(f"- the step's optimizer alone (clip, AdamW, apply, logged norms): {r['optimizer_s']} s; ceiling + "
                 f"optimizer = {_sig(r['gemm_ceiling_s'] + r['optimizer_s'])} s = "
                 f"**{r['bound_fraction_of_peak']:.0%} of the peak**: the most the update FLOP rate can be with these "
                 "GEMMs and this optimizer")
  lines += ["",
           "| lhs | rhs | contracting / batch dims | count | GFLOP / step | ms each | GFLOP/s alone | % of peak |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for m in r["matmuls"][:top]:
    (lc, rc), (lb, rb) = m["dims"]
    lines.append(f"| {m['lhs']} | {m['rhs']} | {list(lc)}x{list(rc)} / {list(lb)}x{list(rb)} | {m['count']} | "
                 f"{m['gflop']} | {m['ms_each']} | {m['gflops']} | {m['gflops'] / r['peak_gflops']:.0%} |")
  rest = r["matmuls"][top:]
  if rest:
    lines.append(f"| ({len(rest)} more shapes) | | | {sum(m['count'] for m in rest)} | "
                 f"{round(sum(m['gflop'] for m in rest), 2)} | | | |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  host_memory.keep_freed_memory()  # as the benchmark runner and the training command line
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", required=True, help="a folder built by experiments.benchmarks.workloads")
  p.add_argument("--mode", choices=ours_grpo.ESTIMATORS, default="grpo")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--steps", type=int, default=5, help="warm train steps timed (after 2 untimed)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gemm_ceiling"))
  args = p.parse_args(argv)
  if not os.path.isfile(os.path.join(args.workload, "workload.json")):
    p.error(f"--workload {args.workload}: no workload.json there; build one with "
            "`python -m experiments.benchmarks.workloads OUT_ROOT`")
  result = run(args.workload, args.mode, args.reps, args.steps)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(render(result))
  print(render(result))


if __name__ == "__main__":
  main(sys.argv[1:])
