"""The CPU demo (README): cold start on the mixed-difficulty synthetic task, GRPO vs GARL vs PAFT (issue 14).

Command:   python -m experiments.demo            (pretrains once, then 8 methods x 3 seeds; writes the tables, PNGs)
           python -m experiments.demo --long     (5 seeds, 2x steps)
           python -m experiments.demo --set optimizer=sgd --set learning_rate=0.1 --set normalize_mq=false --tag sgd
One run:   python -m experiments.train --config demo --workdir /tmp/demo_garl --set estimator=garl --set q=0.75
           (needs the pretrained model: run `python -m experiments.demo --pretrain-only` once; it links
           $TSALLIS_JAX_CACHE/demo_pretrain/demo to the cached folder of the current recipe)
Runtime:   the whole default demo is sized for about 10 minutes on 2 idle CPU cores, pretraining included
           (experiments/results/demo_table.md records the measured wall and CPU time).
Expected:  experiments/results/demo_prediction.md states the prediction and the decision rules, written and committed
           before the first run of this task; demo_table.md and the README report the measured result against it.
           Measured (commit 2fcfc71, 3 seeds): no probe prompt of the medium / hard / hardest buckets reaches P = 1/2
           in 200 steps; the hard-bucket log10 P gain rises with q (-5.3 at q = 0, +0.4 at q = 1: low q learns the easy
           map and leaks it into the hard buckets); easy-bucket test p@1 gains most at q <= 0.5.

The task (tsallis_jax.data.synthetic.mixed_task): chains of 4 modular operations (mod 10); the gold rationale writes
every partial result; prompts come in four difficulty buckets (easy / medium / hard / hardest) whose answers are the
last 1 / 2 / 3 / 4 partial results under a bucket-specific answer map the pretrained model never saw with correct
answers, so the cold-start P of a prompt is about 10^-k (1e-1 ... 1e-4; measured per prompt by the demo). Prompts
are cold (linearised question, no instructions, spec 1.7).

Choices where the paper is silent, fixed before any result on this task (demo_prediction.md says why): AdamW (b1 .9,
b2 .999, no weight decay), lr 3e-4 constant after 10 warm-up steps, global-norm clip 1, 200 steps of 8 prompts x 8
samples, temperature 1 for training rollouts and evaluation, no KL penalty (the k3 KL to the initial policy is logged as `kl`), GRPO with TRL's
defaults as the trainer implements them and one on-policy step per batch (the PPO clip is then inactive), GARL with
the RLOO baseline and the paper's 1/M^q normalisation, PAFT with K = M resamples. The validation split is evaluated
at steps 0, 50, 100, 150, 200 and the test split on the best of those by maj@16 (step 0 included).
"""
import os

from tsallis_jax.train.config import TrainConfig

DEMO_TASK_OPTIONS = "answer_lens=1/2/3/4,steps=4,modulus=10,train=4096,val=64,test=192"
DEMO_MODEL = "tiny"  # ModelConfig.tiny(): 2 layers, D 64, 4 query / 2 kv heads, vocabulary of the word tokenizer
DEMO_PRETRAIN_STEPS = 800
# A literal path: `python -m experiments.demo` links it to the cached pretrained params of the current recipe.
DEMO_INIT = os.path.join(os.environ.get("TSALLIS_JAX_CACHE", os.path.expanduser("~/.cache/tsallis_jax")),
                         "demo_pretrain", "demo", "params")


def get_config() -> TrainConfig:
  return TrainConfig(
      name="demo", model=DEMO_MODEL, task="synthetic", task_options=DEMO_TASK_OPTIONS, prompt_style="cold",
      init_checkpoint=DEMO_INIT, max_prompt_len=16, rationale_budget=20, max_answer_len=5,
      estimator="garl", q=0.75, weights="likelihood", baseline="rloo", num_samples=8, batch_size=8, num_steps=200,
      learning_rate=3e-4, warmup_steps=10, grad_clip=1.0, temperature=1.0, eval_temperature=1.0,
      eval_num_samples=16, eval_every=50, eval_batch_size=16, checkpoint_every=0, max_to_keep=1,
      progress_bar="off", console_log=False, tensorboard=False, log_ref_kl=True)
