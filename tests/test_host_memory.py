"""`tsallis_jax.host_memory.keep_freed_memory`: with it, a jitted program's large temporary stays mapped between
calls (no page faults after the first); without it glibc maps and unmaps it every call. Each case runs in a fresh
interpreter (the allocator must be set before JAX starts its backend)."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from tsallis_jax import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "on" else {}
    import jax, jax.numpy as jnp
    # y (2048 x 16384 float32 = 128 MiB) is a temporary of the program: the reversed product needs all of it.
    f = jax.jit(lambda x, w: jnp.sum((x @ w) * (x @ w)[::-1]))
    x, w = jnp.ones((2048, 64)), jnp.full((64, 16384), 1e-3)
    faults = []
    for _ in range(8):
      time.sleep(0.1)  # the runtime frees a call's temporaries just after its result is ready; a train loop's
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # host work between steps leaves it that time
      f(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("PROBE " + json.dumps({"applied": applied, "faults": faults}))
""")


def _probe(mode: str, **env: str) -> dict:
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  full_env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **env})
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=full_env, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  return json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[len("PROBE "):])


def _thp_mode() -> str:
  try:
    text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
  except OSError:
    return "unknown"
  return text[text.index("[") + 1:text.index("]")] if "[" in text else "unknown"


def test_the_temporary_stays_mapped_between_calls():
  on, off = _probe("on"), _probe("off")
  assert on["applied"] == {"MALLOC_ARENA_MAX": 1, "MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 2**31 - 1}
  # Two 128 MiB temporaries in 4 KiB pages: 65536 faults when mapped afresh. With the setting most calls after the
  # first reuse the mapped heap (now and then the heap's layout makes one map a new region); without it none do.
  assert sum(f < 2000 for f in on["faults"][1:]) >= 4, on
  if _thp_mode() in ("madvise", "never"):  # with THP "always" the kernel maps it in 2 MiB pages anyway
    assert min(off["faults"][1:]) > 20000, off


def test_an_exported_setting_or_an_accelerator_wins():
  assert _probe("on", MALLOC_ARENA_MAX="4")["applied"] == {"MALLOC_MMAP_MAX_": 0,
                                                           "MALLOC_TRIM_THRESHOLD_": 2**31 - 1}
  assert _probe("on", JAX_PLATFORMS="cpu,cuda")["applied"] == {}


_TRIM_PROBE = textwrap.dedent("""
    import json, sys
    from tsallis_jax import host_memory
    host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()  # a compile far shorter than 1 s
    quick = host_memory.compile_trims
    host_memory.TRIM_AFTER_COMPILE_S = 0.0
    jax.jit(lambda x: jnp.cos(x) + 1)(jnp.ones(3)).block_until_ready()
    print("PROBE " + json.dumps({"quick": quick, "after": host_memory.compile_trims}))
""")


def test_a_long_compile_is_followed_by_a_heap_trim():
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
  out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], env=env, capture_output=True, text=True, timeout=300,
                       check=True).stdout
  probe = json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
  assert probe["quick"] == 0 and probe["after"] >= 1, probe
