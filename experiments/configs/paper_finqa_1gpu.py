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
  qwen3_0_6b 1,2`; experiments/benchmarks/README.md "Memory"): see MEMORY below. The rollout fits one H200 (49.6
  GiB); the train step, by the CPU analysis, does not (779 GiB; see MEMORY). CPU XLA assigns buffers differently
  from GPU XLA, so these are estimates of the H200's peak, not measurements.
Runtime: not measured (no accelerator lent when this was written); 400 steps of 1024 rollouts of ~4k tokens on one
  GPU is days, not hours.
Expected: the paper's FinQA numbers (see `paper_finqa`); this config changes memory, not the samples or the gradient.
"""
from experiments.configs._paper import paper_config

# GiB on one device, XLA's memory_analysis() compiled for CPU, 1- and 2-layer models extrapolated to 28 layers.
# The rollout fits (49.6 GiB peak). The train step does NOT fit by this analysis: 772 GiB of temporaries, ~26.6 GiB
# per layer, about what every layer's activations of one 32-row micro-batch would take, as if remat were not in
# effect in CPU XLA's buffer assignment (the analytic estimate of launch/slices.py, which counts remat, gives ~35
# GiB). Open: check on a GPU (memory_analysis() compiled for the H200) before trusting either number.
MEMORY = {
    "rollout": {"argument": 2.22, "output": 0.07, "temp": 47.28, "peak": 49.57},
    "train_step": {"argument": 6.71, "output": 6.66, "temp": 772.34, "alias": 6.66, "peak": 779.05},
    "peak_gib": 779.05,
}


def get_config():
  return paper_config("finqa").replace(name="paper_finqa_1gpu", rollout_chunk_rows=64, kv_cache_dtype="bfloat16",
                                       mesh_data=1, mesh_fsdp=1)
