"""TRL (PyTorch, CPU) on a benchmark workload: its GRPOTrainer step, or `transformers` `generate`. TRL venv.

  $PEERS_HOME/trl/bin/python trl_runner.py --workload DIR --mode grpo|sample [--steps N] [--beta B]

Adapted from ../shared/bench/trl_grpo_tiny.py (the reference scripts), generalised to read the shapes from
`workload.json`. No vLLM: generation is `model.generate` with a DynamicCache. Step boundaries are TrainerCallback
`on_step_end` marks (step 0 includes start-up and is excluded from the medians).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402


def load_tokenizer(folder):
  # AutoTokenizer would pick the architecture's own tokenizer class from config.json (wrong pre-tokenizer).
  tok = PreTrainedTokenizerFast.from_pretrained(folder)
  tok.padding_side = "left"
  return tok


def sanity_logits(model):
  with torch.no_grad():
    x = torch.tensor([common.SANITY_IDS])
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1, :5].numpy()


def run_sample(args, spec, folder):
  tok = load_tokenizer(folder)
  prompts, _ = common.read_prompts(folder)
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  sanity = sanity_logits(model)
  batch = [prompts[i % len(prompts)] for i in range(spec["sample_batch"])]
  gen_cfg = transformers.GenerationConfig(
    max_new_tokens=spec["max_new"], min_new_tokens=0, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
  times = []
  for s in range(common.steps_for(args, spec)):
    torch.manual_seed(s)
    t0 = time.perf_counter()
    enc = tok(batch, return_tensors="pt", padding=True)  # tokenizing is part of the call, as in tunix's sampler
    with torch.no_grad():
      out = model.generate(**enc, generation_config=gen_cfg)
    tok.batch_decode(out[:, spec["prompt_len"]:], skip_special_tokens=True)
    times.append(time.perf_counter() - t0)
  common.emit(system="trl", version=version(), spec=spec, mode="sample", times_s=times,
              tokens_per_step=spec["sample_batch"] * spec["max_new"], sanity=sanity,
              extra={"sampler": "transformers generate (DynamicCache)", "threads": torch.get_num_threads()})


def run_grpo(args, spec, folder):
  from datasets import Dataset
  from trl import GRPOConfig, GRPOTrainer
  beta = spec["beta"] if args.beta is None else args.beta
  steps = common.steps_for(args, spec)
  tok = load_tokenizer(folder)
  prompts, reward_token = common.read_prompts(folder)
  sanity = sanity_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
  rewards_seen = []

  def reward_fn(prompts, completions, **kwargs):
    r = common.reward_contains(reward_token, completions)
    rewards_seen.append(sum(r))
    return r

  n = spec["num_prompts"] * spec["group_size"]
  cfg = GRPOConfig(
    output_dir=os.path.join(os.environ.get("PEERS_HOME", os.path.expanduser("~/.cache/peers")), "trl_out"),
    use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
    per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
    num_generations=spec["group_size"], max_completion_length=spec["max_new"],
    temperature=1.0, top_p=1.0, top_k=0, beta=beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
    learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
    adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
    max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", use_vllm=False,
    shuffle_dataset=False, log_completions=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    model_init_kwargs={"dtype": torch.float32})
  trainer = GRPOTrainer(model=folder, reward_funcs=reward_fn, args=cfg,
                        train_dataset=Dataset.from_dict({"prompt": prompts[:spec["num_prompts"]]}),
                        processing_class=tok)
  phases = {"generate_and_score": []}
  fn = trainer._generate_and_score_completions  # pylint: disable=protected-access

  def timed(*a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    phases["generate_and_score"].append(time.perf_counter() - t0)
    return out
  trainer._generate_and_score_completions = timed  # pylint: disable=protected-access
  marks = {"begin": None, "end": []}

  class Timer(TrainerCallback):
    def on_train_begin(self, a, state, control, **kw):
      marks["begin"] = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
      marks["end"].append(time.perf_counter())

  trainer.add_callback(Timer())
  trainer.train()
  ends = marks["end"]
  times = [ends[0] - marks["begin"]] + [b - a for a, b in zip(ends, ends[1:])]
  phases["update (rest of step)"] = [t - g for t, g in zip(times, phases["generate_and_score"])]
  common.emit(system="trl", version=version(), spec=spec, mode="grpo", times_s=times,
              tokens_per_step=n * spec["max_new"], phases=phases, sanity=sanity,
              extra={"beta": beta, "rewards_per_step": rewards_seen, "threads": torch.get_num_threads()})


def version():
  import trl
  return f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}"


def main():
  args = common.parse_args()
  spec = common.read_spec(args.workload)
  print("trl runner:", version(), "threads", torch.get_num_threads(), flush=True)
  (run_sample if args.mode == "sample" else run_grpo)(args, spec, args.workload)


if __name__ == "__main__":
  main()
