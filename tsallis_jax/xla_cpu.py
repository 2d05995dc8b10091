"""XLA:CPU compile options per program: which emitters compile a program whose layers run under scan (issue 17).

A CPU-only code path (on other backends no option is set). XLA:CPU compiles its elementwise and reduction fusions
with one of two code generators: the MLIR fusion emitters (its default, `xla_cpu_use_fusion_emitters=true`) or its
older IR emitters (`false`). Code generation is most of a compile: in a profile of the `smollm2` benchmark's scanned
train step (`ModelConfig.scan_layers`; a `/tmp` probe, `experiments/benchmarks/README.md`, "XLA:CPU's older emitters
for programs under scan") it took 1.9 of the compile's 3.4 s, about 15 ms for each of 257 fusion kernels. The older
emitters compile a scanned program's kernels faster and an unrolled program's much slower, and their elementwise
loops run slower on large arrays. Each `smollm2` program alone, compiled then run, one fresh process per form and
emitter, 2 rounds, on 2 cores of an AVX-512 EPYC (`experiments/benchmarks/program_emitters.py`,
`results/cpu_avx512_2026-12-01/program_emitters.md`; seconds, medians):

  program (`smollm2`)          compile: default / older     warm run: default / older
  scanned rollout              1.39 / 0.94                  0.53 / 0.47
  scanned train step           4.07 / 2.61                  0.91 / 1.07
  unrolled rollout             2.53 / 7.15                  0.45 / 0.44
  unrolled train step          10.8 / 33.9                  0.76 / 0.89

In the trainer's step (`experiments/benchmarks/cpu_emitters.py`, 4 rounds of fresh processes): "auto" against "xla",
the `smollm2` first step 6.6 against 7.5 s, `tiny` 4.8 against 5.3 s, the rollout phase within the spread (3.1%
faster, 0.8% slower); "quick_compile" gives the shortest first step (`smollm2` 5.7 s, `tiny` 3.5 s) and a 16% slower
`smollm2` update (an 11% faster `tiny` one).

`TrainConfig.cpu_emitters` chooses (`CPU_EMITTERS`):

  "auto"           (default) the older emitters for rollouts that decode under the scan (a scanned model without
                   `rollout_unroll_layers`): a shorter compile, the run within the spread; XLA's default for
                   everything else.
  "xla"            XLA's default for every program (the ablation, `experiments/benchmarks/cpu_emitters.py`).
  "quick_compile"  the older emitters for the train step of a scanned model as well: the shortest first step, a
                   slower update every step after it on `smollm2`. For short CPU runs (a smoke test, a debugging
                   session): on `smollm2` a run of more than about 10 steps loses more than the compile saves.

Unrolled programs always keep XLA's default. These are the trainer's programs (`train.programs.build_programs`);
the `tsallis_jax.sampler.Sampler` applies the rollout's rule when asked (`Sampler(cpu_emitters="auto")`; its default
is "xla", by its own A/B), and `sampler.generate` called directly compiles with XLA's default
(`sampler.generate_with_options` takes options). This module imports nothing heavy (`TrainConfig` validates against
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


def program_options(choice: str, *, scan_layers: bool, unroll_decode: bool, platform: str
                    ) -> dict[str, dict[str, Any] | None]:
  """`compiler_options` of each of `PROGRAMS` for a model with `scan_layers` (`ModelConfig.scan_layers`) whose
  rollouts decode unrolled with `unroll_decode` (`TrainConfig.rollout_unroll_layers`): the rollout runs its layers
  under the scan only when the model is scanned and does not decode unrolled."""
  scanned = {"rollout": scan_layers and not unroll_decode, "train_step": scan_layers}
  return {program: compiler_options(choice, program, layers_scanned=scanned[program], platform=platform)
          for program in PROGRAMS}
