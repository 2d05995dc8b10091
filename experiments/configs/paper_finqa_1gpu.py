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
Memory (XLA's `memory_analysis()` of the compiled rollout and train step on abstract shapes, the full 28-layer
  model compiled for CPU in ~15 s, since the layers run under scan; `python -m tsallis_jax.train.memory
  paper_finqa_1gpu qwen3_0_6b`; experiments/benchmarks/README.md "Memory"): rollout peak 49.8 GiB (47.2 GiB with
  the decode under scan, before `rollout_unroll_layers`: the unrolled block weights are a float32 copy), train step
  peak 60.4 GiB (each micro-batch's prompt run once for its 32 rollouts, packed with them, `share_prompt_forward`; 73.2
  GiB with every full sequence), so the device peak is 60.4 GiB of the H200's 131 GiB (141 GB). CPU XLA assigns buffers
  differently from GPU XLA: the same analysis compiled for an H200 (JAX 0.11.2, 2026-11-30, `MEMORY_H200` below) gives
  a 45.9 GiB rollout (decode under scan) and a 48.6 GiB train step. Both are XLA's buffer assignments, not a
  measured run. The scan
  matters: with the layers unrolled, the same analysis gave a 779 GiB train step (1- and 2-layer compiles
  extrapolated), because the per-layer remat was undone (tests/test_memory.py
  `test_remat_bounds_the_backward_only_under_scan`).
Runtime: not measured (no step of this config has run on a GPU); 400 steps of 1024 rollouts of ~4k tokens on one
  GPU is days, not hours.
Expected: the paper's FinQA numbers (see `paper_finqa`); this config changes memory, not the samples or the gradient.
"""
from experiments.configs._paper import paper_config

# GiB on one device, XLA's memory_analysis() compiled for CPU (28 layers under scan, remat full), 2026-11-30, with the
# default share_prompt_forward, packed prompt groups (the train step was temp 66.48 / peak 73.19 with every full
# sequence, and temp 55.86 / peak 62.57 with a prompt pass followed by a completion pass), and the rollout decoding with
# the layers unrolled (`rollout_unroll_layers`; temp 44.94 / peak 47.23 with the decode under scan).
# tests/test_memory.py::test_paper_finqa_1gpu_analysis_matches_its_record recomputes it (slow).
MEMORY = {
    "rollout": {"argument": 2.22, "output": 0.07, "temp": 47.47, "peak": 49.76},
    "train_step": {"argument": 6.71, "output": 6.66, "temp": 53.66, "alias": 6.66, "peak": 60.37},
    "peak_gib": 60.37,
}

# The same analysis compiled for one NVIDIA H200 (GPU XLA, JAX 0.11.2 with CUDA 13, GEMM autotuning off), 2026-11-30:
# experiments/benchmarks/results/device_h200_2026-11-30/memory_gpu.json (`device_check.sh`, part 5); the rollout
# then decoded under the scan (before `rollout_unroll_layers`).
MEMORY_H200 = {
    "rollout": {"argument": 2.22, "output": 0.07, "temp": 43.58, "peak": 45.88},
    "train_step": {"argument": 6.71, "output": 6.66, "temp": 41.87, "alias": 6.66, "peak": 48.58},
    "peak_gib": 48.58,
}


def get_config():
  return paper_config("finqa").replace(name="paper_finqa_1gpu", rollout_chunk_rows=64, kv_cache_dtype="bfloat16",
                                       mesh_data=1, mesh_fsdp=1)
