"""XLA:CPU compile options per program: which emitters compile a program whose layers run under scan (issue 17).

A CPU-only code path (on other backends no option is set). XLA:CPU compiles its elementwise and reduction fusions
with one of two code generators: the MLIR fusion emitters (its default, `xla_cpu_use_fusion_emitters=true`) or its
older IR emitters (`false`). Code generation is most of a compile: the `smollm2` benchmark's scanned train step
(`ModelConfig.scan_layers`) spends 1.9 of its 3.4 s compiling 257 fusion kernels, about 15 ms each on the MLIR path.
The older emitters compile a scanned program's kernels faster but an unrolled program's much slower, and their
elementwise loops run slower on large arrays (measured on 2 cores of an AVX-512 EPYC, one fresh process per compile;
`experiments/benchmarks/README.md`, "XLA:CPU's older emitters for programs under scan"):

  program (`smollm2`)          compile: fusion / older emitters     warm run: fusion / older emitters
  scanned rollout              1.37 s / 0.91 s                      0.48-0.53 s / 0.46 s
  scanned train step           3.8-3.9 s / 2.4 s                    0.86-1.00 s / 0.97-1.10 s (the optimizer's loops)
  unrolled rollout             2.1-2.3 s / 6.4-6.7 s                0.42-0.44 s / 0.43-0.45 s
  unrolled train step          8.9-9.5 s / 30-31 s                  0.71 s / 0.87 s

In the trainer's step (`experiments/benchmarks/cpu_emitters.py`, 4 rounds of fresh processes): "auto" against "xla",
the `smollm2` first step 6.6 against 7.5 s with the rollout 3% faster, `tiny` 4.8 against 5.3 s with the rollout
within 1%; "quick_compile" gives the shortest first step (`smollm2` 5.7 s, `tiny` 3.5 s) and a 16% slower `smollm2`
update (a 12% faster `tiny` one).

`TrainConfig.cpu_emitters` chooses (`CPU_EMITTERS`):

  "auto"           (default) the older emitters for rollouts that decode under the scan (a scanned model without
                   `rollout_unroll_layers`): a shorter compile and no slower run; XLA's default for everything else.
  "xla"            XLA's default for every program (the ablation, `experiments/benchmarks/cpu_paths.py`).
  "quick_compile"  the older emitters for the train step of a scanned model as well: the shortest first step, a
                   slower update every step after it. For short CPU runs (a smoke test, a debugging session); a run
                   of more than about 15 steps loses more per step than the compile saves.

Unrolled programs always keep XLA's default. This module imports nothing heavy (`TrainConfig` validates against
`CPU_EMITTERS`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  import jax

#: `TrainConfig.cpu_emitters` values (see the module docstring).
CPU_EMITTERS = ("auto", "xla", "quick_compile")
#: The programs a choice applies to.
PROGRAMS = ("rollout", "train_step")
OLDER_EMITTERS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


def platform_of(mesh: jax.sharding.Mesh) -> str:
  """The platform of the mesh's devices ("cpu", "gpu", "tpu")."""
  return mesh.devices.flat[0].platform


def compiler_options(choice: str, program: str, *, layers_scanned: bool, platform: str) -> dict[str, Any] | None:
  """The `compiler_options` for `jax.jit` of `program` ("rollout" or "train_step") under `choice` (a
  `CPU_EMITTERS` value): `OLDER_EMITTERS` or None (XLA's default). `layers_scanned`: the program runs the decoder
  blocks under one scan (for a rollout: a scanned model that does not decode unrolled)."""
  if choice not in CPU_EMITTERS:
    raise ValueError(f"cpu_emitters={choice!r} is not one of {CPU_EMITTERS}")
  if program not in PROGRAMS:
    raise ValueError(f"program={program!r} is not one of {PROGRAMS}")
  if platform != "cpu" or not layers_scanned or choice == "xla":
    return None
  if program == "rollout" or choice == "quick_compile":
    return dict(OLDER_EMITTERS)
  return None
