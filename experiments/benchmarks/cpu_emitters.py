"""A/B of XLA:CPU's emitters for a scanned model's programs: does `TrainConfig.cpu_emitters` pay? (issue 17)

  python -m experiments.benchmarks.cpu_emitters [--rounds 2] [--workloads tiny smollm2]

`tsallis_jax.xla_cpu` compiles the rollout of a model whose layers run under scan (`ModelConfig.scan_layers`)
with XLA:CPU's older IR emitters (`cpu_emitters="auto"`, the default) and leaves the train step on XLA's default;
`"xla"` leaves every program on XLA's default (the ablation); `"quick_compile"` moves the train step to the older
emitters as well (the opt-in for short runs). Each round runs `ours_grpo.py --scan-layers` (GRPO, the workload's
steps, cold: a fresh compile cache) three ways, alternating, each in its own process (`cpu_paths.run_ablation`).
Writes `results/cpu_emitters.json` and `results/cpu_emitters.md`: per variant the median over rounds of the
warm-step median, its rollout and update phases, the first step and the peak RSS, and the default's step over each.
The unrolled model (the default form) is not affected: its programs keep XLA's default under every choice.
The prediction and the decision rule written before the first run: benchmarks README, "This project's step".
"""
from __future__ import annotations

import sys

from experiments.benchmarks import cpu_paths

VARIANTS = {"auto (default)": ["--scan-layers"], "xla": ["--scan-layers", "--cpu-emitters", "xla"],
            "quick_compile": ["--scan-layers", "--cpu-emitters", "quick_compile"]}
TITLE = "XLA:CPU's emitters for a scanned model's programs (TrainConfig.cpu_emitters)"


def main(argv=None) -> int:
  return cpu_paths.run_ablation(VARIANTS, "cpu_emitters", TITLE, list(sys.argv[1:] if argv is None else argv),
                                __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
