"""The CPU demo (README): cold start on a synthetic task, GRPO vs GARL (q in {0, .5, .75, 1}) vs PAFT (q = .75).

Command:   python -m experiments.demo            (pretrains once, then every method x seed; writes the table and PNG)
           python -m experiments.demo --long     (5 seeds, 2x steps)
One run:   python -m experiments.train --config demo --workdir /tmp/demo_garl --set estimator=garl --set q=0.75
           (needs the pretrained model: run experiments.demo once, or `python -m experiments.demo --pretrain-only`)
Runtime:   the whole default demo is sized for about 10 minutes on 2 idle CPU cores, pretraining included
           (experiments/results/demo_table.md records the measured wall and CPU time).
Expected:  by the paper (Table 1, spec 1.7): GRPO and GARL q <= 0.5 stall near the cold-start p0 ~ 0.01, GARL
           q >= 0.75 escapes. Measured with these settings (experiments/results/demo_table.md, commit 4df3594):
           p0 = 0.0097 and no method escapes in 150 steps; lr 1e-3 lets every policy drift far from the pretrained
           one (kl/ref peaks of 3-38 nats per token). The 5-seed lr 1e-4, 300-step ablation
           (demo_table_long_lr1e-4.md) gets GRPO stalling and every GARL q to P-hat ~ 0.1 without escaping; with
           the pretrained model of an earlier commit the same ablation had q >= 0.5 escaping in 2-3 of 5 seeds.
           demo_notes.md has all of it and what we learned; nothing was tuned to agree.

The task (tsallis_jax.data.synthetic): chains of 4 modular operations (mod 10); the gold rationale writes every
partial result; the answer is the last two partial results under an answer map v -> 3v + 7 (mod 10) that the
pretrained model never saw with correct answers, so p0 ~ 10^-2 (measured by experiments.demo and printed in the
table). Prompts are cold (linearised question, no instructions, spec 1.7).

Choices where the paper is silent: AdamW (b1 .9, b2 .999, no weight decay), lr 1e-3 constant after 10 warm-up steps,
global-norm clip 1, temperature 1 for training rollouts and evaluation, no KL penalty (kl/ref is logged), GRPO with
group std scaling and one on-policy step per batch (the PPO clip is then inactive), GARL with the RLOO baseline and
the paper's 1/M^q normalisation, PAFT with K = M resamples. Escape = first step at which the training success rate
(exact match of the sampled answer, 10-step moving average) reaches 1/2, the delta of the spec's escape times.
"""
from tsallis_jax.train.config import TrainConfig

DEMO_TASK_OPTIONS = "p0=0.01,steps=4,modulus=10,train=4096,val=64,test=128"
DEMO_MODEL = "tiny"  # ModelConfig.tiny(): 2 layers, D 64, 4 query / 2 kv heads, vocabulary of the word tokenizer


def get_config() -> TrainConfig:
  from experiments.demo import pretrained_params_path
  return TrainConfig(
      name="demo", model=DEMO_MODEL, task="synthetic", task_options=DEMO_TASK_OPTIONS, prompt_style="cold",
      init_checkpoint=pretrained_params_path(), max_prompt_len=16, rationale_budget=20, max_answer_len=4,
      estimator="garl", q=0.75, weights="likelihood", baseline="rloo", num_samples=8, batch_size=8, num_steps=150,
      learning_rate=1e-3, warmup_steps=10, grad_clip=1.0, temperature=1.0, eval_temperature=1.0,
      eval_num_samples=16, eval_every=50, eval_batch_size=16, checkpoint_every=0, max_to_keep=1,
      progress_bar="off", tensorboard=False, log_ref_kl=True)
