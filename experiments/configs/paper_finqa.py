"""The paper's FinQA runs: Qwen3-0.6B, M = 32, q in {0, .25, .5, .75, 1}, cold and warm start (spec 1.7).

Command (one run; every host of a pod runs the same line with a workdir all hosts see, see launch/):
  python -m experiments.train --config paper_finqa --workdir /shared/runs/finqa_cold_garl_q0.75 \\
      --set model_path=/path/to/Qwen3-0.6B --set data_dir=/path/to/finqa_official_files \\
      --set estimator=garl --set q=0.75 --set prompt_style=cold
The sweep: estimator in {grpo, garl, paft}, q in {0, 0.25, 0.5, 0.75, 1}, prompt_style in {cold, warm}.
Rationale budget 4096-128 tokens before `</think>` is forced, 128 answer tokens (spec 1.7).
Runtime: not measured (no run at paper scale on an accelerator yet); 400 steps x 32 prompts x 32 rollouts of up to the
  budget in tokens is a multi-host TPU job, not a CPU one.
Expected (the paper's numbers, x100):
  cold q=0.75: p@1 30.5, p@16 61.1, m@16 38.3 (Table 1);
  GRPO and q <= 0.5: 0;
  warm m@16: GRPO 26.9, GARL q=0.25 38.7 (Table 3).
"""
from experiments.configs._paper import paper_config


def get_config():
  return paper_config("finqa")
