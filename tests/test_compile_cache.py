"""`train.compile_cache.enable`: the trainer's persistent compilation cache, and who wins when several set it.

Each case runs in a fresh interpreter: the cache is process-wide JAX configuration (the suite's own conftest points
it at a session folder)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp
    from tsallis_jax.train import compile_cache
    if os.environ.get("PROBE_DISABLE"):
      jax.config.update("jax_enable_compilation_cache", False)
    used = compile_cache.enable(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(5.0)).block_until_ready()
    print("PROBE " + json.dumps({"used": used, "config": jax.config.jax_compilation_cache_dir}))
""")


def _probe(path: str, **env: str) -> dict:
  full_env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  full_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
  out = subprocess.run([sys.executable, "-c", _PROBE, path], env=full_env, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  return json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[len("PROBE "):])


def _entries(folder) -> list[str]:
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_enable_points_the_cache_at_the_folder_and_programs_are_written(tmp_path):
  folder = tmp_path / "xla"
  got = _probe(str(folder))
  assert got == {"used": str(folder), "config": str(folder)}
  assert any(name.startswith("jit_") for name in _entries(folder)), _entries(folder)


@pytest.mark.parametrize("how", ["env", "disabled", "empty"])
def test_the_users_setting_wins(tmp_path, how):
  mine, theirs = tmp_path / "mine", tmp_path / "theirs"
  if how == "env":  # $JAX_COMPILATION_CACHE_DIR is JAX's own setting: enable leaves it, and it is the one used
    got = _probe(str(mine), JAX_COMPILATION_CACHE_DIR=str(theirs))
    assert got == {"used": str(theirs), "config": str(theirs)}
    assert _entries(theirs)
  elif how == "disabled":
    got = _probe(str(mine), PROBE_DISABLE="1")
    assert got["used"] is None
  else:  # compile_cache="" leaves JAX's default (no cache)
    got = _probe("")
    assert got == {"used": None, "config": None}
  assert not _entries(mine)
