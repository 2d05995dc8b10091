"""Shared settings of the paper's Qwen3-0.6B runs (spec 1.7); the per-dataset configs document the commands."""
from tsallis_jax.train.config import TrainConfig

# Rationale budgets of spec 1.7: "FinQA uses 4k-128 tokens, HotPotQA 3k-128, and MuSiQue 2k-128, where the 128-token
# offset reserves space for the answer".
RATIONALE_BUDGET = {"finqa": 4096 - 128, "hotpotqa": 3072 - 128, "musique": 2048 - 128}


def paper_config(task: str) -> TrainConfig:
  """Qwen3-0.6B from an HF folder, M = 32 rollouts per prompt, 16 evaluation samples, the paper's budgets.

  The paper does not give the optimiser, learning rate, batch size, step count, temperature, GRPO clip or KL
  (spec 1.7, "Not found in v1"); the values below are documented choices: AdamW lr 1e-6 with 20 warm-up steps and
  clip 1 (common for RL on sub-1B models), 32 prompts per step, 400 steps (about 2 epochs of FinQA's 6145
  prompts), temperature 1, no KL penalty, GRPO with group std scaling.

  Memory: B x G = 1024 sequences of up to ~6k tokens do not fit one forward/backward, so gradients are accumulated
  over micro-batches of one prompt (its 32 rollouts; the rows split over the devices) and log-probs come from hidden
  states 512 positions of the 151,936-word vocabulary projection at a time (float32 logits of 32 x 512 x V are
  ~9 GiB on one device, ~2.3 GiB per device on 4). Same gradient as the full batch (tests/test_train_microbatch.py).
  The model rematerialises each layer and computes attention 512 queries at a time (`model_overrides`), so the
  attention scores of a 6k-token rollout are never held for all queries and layers at once. The layers run under
  scan (`scan_layers=true`): XLA's memory analysis of the unrolled form shows the per-layer remat undone (the
  recomputations are scheduled together, temporaries grow by a whole layer's activations per layer), while under
  scan the train step's temporaries are flat in depth (experiments/benchmarks/README.md, "Memory"). That analysis is
  CPU XLA's: on the H200 the device check's unrolled step with remat ran in the same 50 GB as the scanned one
  (benchmarks README, "On an accelerator"), so GPU XLA keeps the remat in both forms. Rollouts decode with the
  layers unrolled (`rollout_unroll_layers`): on the H200 the scanned GRPO step took 4.18 s with the decode under
  scan and 2.77 s with it unrolled, as fast as the unrolled model's 2.73 s (device check shapes, 2026-11-30). None
  of this was run at paper scale here (short H200 checks only); the memory numbers are XLA's analyses and shape
  estimates.
  """
  return TrainConfig(
      name=f"paper_{task}", model="hf", model_path="/path/to/Qwen3-0.6B", dtype="bfloat16", task=task,
      data_dir=f"/path/to/{task}", prompt_style="cold", max_prompt_len=2048, rationale_budget=RATIONALE_BUDGET[task],
      max_answer_len=128, estimator="garl", q=0.75, weights="likelihood", baseline="rloo", num_samples=32,
      batch_size=32, num_steps=400, learning_rate=1e-6, warmup_steps=20, grad_clip=1.0, temperature=1.0,
      eval_temperature=1.0, eval_num_samples=16, eval_every=50, eval_batch_size=32, checkpoint_every=25,
      max_to_keep=3, log_ref_kl=False, micro_batch_prompts=1, logprob_chunk=512,
      model_overrides="remat=full,scan_layers=true,attention_query_chunk=512", rollout_unroll_layers=True)
