"""A/B of a scanned model's rollout: decode with the layers unrolled or under the scan (issue 17).

  python -m experiments.benchmarks.decode_layers [--rounds 2] [--workloads smollm2]

`SamplingConfig.unroll_layers` slices a scanned model's stacked weights into per-layer blocks once per rollout and
decodes with the unrolled loop; off (the default), every decode step runs the layers under the scan. Each round runs
`ours_grpo.py` (GRPO, the workload's steps, cold: a fresh compile cache) three ways, alternating, each in its own
process (`cpu_paths.run_ablation`): layers under scan with the unrolled decode (`--scan-layers --unroll-decode`, the
base), the same with the decode under scan too (`--scan-layers`), and the default unrolled model (no flags) for
reference. Writes `results/decode_layers.json` and `results/decode_layers.md`: per variant the
median over rounds of the warm-step median, its rollout and update phases, the first step and the peak RSS.
The prediction and the decision rule written before the first run: benchmarks README, "This project's step".
"""
from __future__ import annotations

import sys

from experiments.benchmarks import cpu_paths

VARIANTS = {"scan, unrolled decode": ["--scan-layers", "--unroll-decode"], "scan, scanned decode": ["--scan-layers"],
            "unrolled": []}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--workloads" not in argv:
    argv += ["--workloads", "smollm2"]
  return cpu_paths.run_ablation(VARIANTS, "decode_layers", "A scanned model's rollout: layers unrolled or scanned",
                                argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
