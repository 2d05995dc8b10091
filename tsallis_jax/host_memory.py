"""The host allocator under XLA's CPU backend: keep the train step's scratch memory mapped between steps.

On a CPU backend every XLA buffer is host memory from glibc's malloc. A jitted train step's temporaries are one
block (1026 MB on the `smollm2` benchmark when the numbers below were measured: gradients, a clipped copy of them,
activations; 768 MB since `train.schedules.clip_by_global_norm` keeps no copy), allocated and freed every step by a
runtime thread. glibc serves a block that large from a thread's own arena (at most 64 MB) by mmap, and
unmaps it when it is freed, so every step faults the whole block in again: 270k page faults and about 0.45 s of
kernel time per `smollm2` step. `keep_freed_memory()` makes glibc serve every thread from the main heap
(`M_ARENA_MAX` 1), never mmap (`M_MMAP_MAX` 0) and keep the heap's freed top (`M_TRIM_THRESHOLD` 2 GiB): the block
stays mapped and the next step reuses it, with no page faults (in one process, the `smollm2` train step with
and without: 270k faults and 0.45 s of kernel time per step -> none, 2.62 -> 2.35 s). Ablated side by side on the
benchmark's GRPO step (`python -m experiments.benchmarks.cpu_paths`, `results/cpu_paths.md`, 2 rounds): `tiny`
0.190 -> 0.150 s per step; `smollm2` update 2.51 -> 2.41 s with the whole step unchanged (3.16 / 3.15 s: the decode
loop loses what the update gains) and peak RSS 4335 -> 3970 MB; what a run frees stays with the process until it
exits.

The cost: one arena for all threads serialises their small allocations, which slows XLA's multi-threaded compile,
so the first step is longer (`tiny` 4.3 -> 5.7 s, `smollm2` 18.8 -> 22.4 s in that ablation); a training run of
more than a few dozen steps gains it back on `tiny`-like, latency-bound models, and the RSS on large ones.
The ablation re-run at 85ed33f (after the optimizer stopped copying the gradients): `tiny` step 0.166 -> 0.146 s;
`smollm2` update unchanged (1.463 / 1.457 s), step 2.092 -> 2.211 s and first step 18.9 -> 21.7 s, peak RSS 4042 ->
3363 MB. The `smollm2` loss is the decode loop's: the runtime's worker threads allocate each matmul's scratch
(YNNPACK, Eigen / oneDNN) from the one heap, which the compile has fragmented (`_int_malloc` 8% of a rollout's perf
samples after an in-process compile, absent without these settings; a re-run, which loads its programs from the
persistent cache, rolls out in 0.634 s against a cold run's 0.847 s in the side-by-side benchmark).
On a second CPU kind (an AVX-512 EPYC, 2026-12-01; `results/cpu_avx512_2026-12-01/`, 3 rounds): `smollm2` step
1.210 s with these settings against 1.220 s without (within spread), first step 15.8 against 13.4 s, peak RSS 3358
against 3881 MB; and with the layers under scan the warm update takes 0.855 s against 1.467 s without them, since the
scanned step otherwise faults its temporaries in on every step.

What a compile frees is the one thing worth giving back: XLA's compiler allocates hundreds of MB for a train step and
frees them before the program first runs, and kept mapped they sit under the step's scratch, which the heap's
fragments rarely fit, so the process peaks at both. `keep_freed_memory()` therefore also registers a JAX monitoring
listener that calls glibc's `malloc_trim(0)` after every backend compile (or persistent-cache load) of at least
`TRIM_AFTER_COMPILE_S` seconds (small eager ops do not pay for a heap walk): the `smollm2` benchmark step with
`share_prompt_forward` peaked at 3773 MB without it, 3697 MB with it (one process each, `/proc/self/statm` sampled).

It must run before JAX starts its backend (threads that have allocated keep their arenas), so the command lines call
it first thing (`experiments/train.py`, `experiments/demo.py`); in a notebook call it before anything touches JAX.
It applies only where it helps: Linux with glibc, a CPU-only JAX (`JAX_PLATFORMS=cpu`, or no GPU/TPU plugin
installed; on an accelerator the host holds no step temporaries), and no `MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_` or
`MALLOC_TRIM_THRESHOLD_` in the environment (an exported setting wins). The listener imports `jax.monitoring`
after the settings are applied (importing JAX starts no backend); nothing else here imports JAX.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt(3) parameter numbers (glibc's malloc.h)
SETTINGS = (("MALLOC_ARENA_MAX", M_ARENA_MAX, 1), ("MALLOC_MMAP_MAX_", M_MMAP_MAX, 0),
            ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, 2**31 - 1))
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
TRIM_AFTER_COMPILE_S = 1.0  # compiles (or cache loads) at least this long are followed by malloc_trim(0)
compile_trims = 0  # how many times the listener has trimmed (a count for tests and logs)


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names only cpu, or no accelerator plugin is installed."""
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms == ["cpu"]
  return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def keep_freed_memory() -> dict[str, int]:
  """Applies the glibc settings above where they help (see the module docstring); returns those applied."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not cpu_only():
    return {}
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return {}
  if _backend_started():
    log.warning("host_memory.keep_freed_memory() ran after JAX started its backend: threads that already allocated "
                "keep their own arenas, so the train step may still fault its scratch memory in every step; call it "
                "before anything touches JAX.")
  applied = {}
  for env, param, value in SETTINGS:
    if env not in os.environ and mallopt(param, value) == 1:
      applied[env] = value
  if applied:
    _trim_after_compiles()
  return applied


def _trim_after_compiles() -> None:
  """Registers the listener that gives a long compile's freed memory back to the OS (see the module docstring)."""
  try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return
  from jax import monitoring

  def listener(event: str, duration_secs: float, **_) -> None:
    global compile_trims
    if event == COMPILE_EVENT and duration_secs >= TRIM_AFTER_COMPILE_S:
      trim(0)
      compile_trims += 1

  monitoring.register_event_duration_secs_listener(listener)
