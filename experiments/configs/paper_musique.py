"""The paper's MuSiQue runs: Qwen3-0.6B, M = 32, q in {0, .25, .5, .75, 1}, cold and warm start (spec 1.7).

Command (one run; every host of a pod runs the same line with a workdir all hosts see, see launch/):
  python -m experiments.train --config paper_musique --workdir /shared/runs/musique_cold_garl_q0.75 \\
      --set model_path=/path/to/Qwen3-0.6B --set data_dir=/path/to/musique_official_files \\
      --set estimator=garl --set q=0.75 --set prompt_style=cold
The sweep: estimator in {grpo, garl, paft}, q in {0, 0.25, 0.5, 0.75, 1}, prompt_style in {cold, warm}.
Rationale budget 2048-128 tokens before `</think>` is forced, 128 answer tokens (spec 1.7).
Runtime: not measured (no run at paper scale on an accelerator yet); 400 steps x 32 prompts x 32 rollouts of up to the
  budget in tokens is a multi-host TPU job, not a CPU one.
Expected (the paper's numbers, x100):
  cold q=0.75: p@1 26.8, p@16 58.9, m@16 34.8 (Table 2);
  warm m@16: GRPO 15.8, PAFT q=0.75 22.4 (Table 3).
"""
from experiments.configs._paper import paper_config


def get_config():
  return paper_config("musique")
