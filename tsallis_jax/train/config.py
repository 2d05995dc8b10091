"""Training configuration: one frozen dataclass, validated at construction, overridable with `--set key=value`.

Every experiment config under `experiments/configs/` returns a `TrainConfig`. Keys are flat (nanodo style) so that
`--set q=0.5 --set estimator=paft` reads like the paper's tables. Unknown keys and impossible values raise a
`ConfigError` (a `ValueError`) that names the key, the problem and the fix.

Choices where the paper is silent (spec section 1.7, "Not found in v1") are documented next to their defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import pathlib
from typing import Any

from tsallis_jax.errors import ConfigError, InputError  # noqa: F401 (ConfigError is re-exported here)
from tsallis_jax.xla_cpu import CPU_EMITTERS

ESTIMATORS = ("grpo", "garl", "paft")
Q_SCHEDULES = ("constant", "linear", "step", "cosine")
LR_SCHEDULES = ("constant", "cosine", "linear")
BASELINES = ("rloo", "none")
WEIGHTS = ("likelihood", "reward")
PROMPT_STYLES = ("cold", "warm")
REPORT_TO = ("tensorboard", "wandb", "none")
DTYPES = ("float32", "bfloat16")
SCALE_REWARDS = ("group", "batch", "none")  # TRL's GRPOConfig.scale_rewards names
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "seq_sum")  # TRL's GRPOConfig.loss_type names, and seq_sum


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every knob of `train_and_evaluate`; see each field's comment. Validated in `__post_init__`.

  Memory and compute knobs of the train step (same gradient and metrics in exact arithmetic): `micro_batch_prompts`
  (0 = off; m = accumulate gradients over micro-batches of m prompts with their G rollouts), `logprob_chunk` (0 = full
  logits; c = log-probs and entropy from hidden states in chunks of c positions) and `share_prompt_forward` (each
  prompt's forward pass once for its G samples).
  """

  name: str = "unnamed"
  seed: int = 0

  # -- model --------------------------------------------------------------------------------------------------
  model: str = "tiny"  # ModelConfig preset (tiny, qwen3_0_6b, smollm2_135m), "hf" or "gguf" (then model_path)
  # HF folder (config.json + safetensors + tokenizer), a Hub id org/name (a local folder of that name wins; the
  # id resolves through the HF cache, HF_HUB_OFFLINE honoured; tsallis_jax/model/hub.py) or a .gguf file
  model_path: str = ""
  model_overrides: str = ""  # "num_layers=2,embed_dim=64": dataclasses.replace on the ModelConfig preset
  dtype: str = "float32"  # compute dtype; log-softmax is float32 regardless (CONTRIBUTING.md)
  # Parameters to start from when the workdir holds no checkpoint (see `checkpoint.py` for the precedence rule):
  # an orbax params folder written by `save_params` (e.g. the demo's pretrained model) or empty for the model's own
  # initialisation (or the HF/GGUF weights when model is "hf"/"gguf").
  init_checkpoint: str = ""

  # -- task -----------------------------------------------------------------------------------------------------
  task: str = "synthetic"  # "synthetic", "finqa", "hotpotqa", "musique", "fixture"
  task_options: str = ""  # task-specific "k=v,k=v" (e.g. the synthetic task's name and p0 knob)
  data_dir: str = ""  # manual-download folder for the real datasets
  prompt_style: str = "cold"  # cold: linearised (x*, y*) without instructions; warm: task prompt (spec 1.7)
  # The warm prompt as a Python format string over the record's fields ({question}, {context}, {id}, {dataset} and a
  # file's other columns), or "jinja:" + a Jinja template over the same names; "" = the dataset's instructions.
  prompt_template: str = ""
  chat_template: str = "auto"  # auto: the tokenizer's chat template if it has one; on: require it; off: plain prompts
  # task="file": which column holds each role, "question=q,answer=a,aliases=alts,context=ctx,id=uid,split=part"
  # (a role not named reads the column of its own name; tsallis_jax/data/files.py)
  data_columns: str = ""
  max_prompt_len: int = 32  # prompt tokens (left-padded; longer contexts are truncated by tsallis_jax.data.context)
  prompt_bucket: int = 0  # training prompts are padded to a multiple of this (0 = max_prompt_len: one shape bucket)
  rationale_budget: int = 16  # rationale tokens before `</think>` is forced (s1-style budget forcing)
  max_answer_len: int = 8  # answer tokens (gold answer teacher-forced; sampled answer for GRPO/eval)

  # -- estimator (spec 1.6, 2.2, 2.3, 2.6) ------------------------------------------------------------------------
  estimator: str = "garl"  # grpo | garl | paft
  q: float = 0.75  # commitment; start value of the schedule
  q_schedule: str = "constant"  # constant | linear | step | cosine (from q to q_end over q_schedule_steps)
  q_end: float = 0.0  # end value of a q schedule (1 -> 0 is the paper's reading of SFT-then-RL)
  q_schedule_steps: int = 0  # steps over which q moves from q to q_end (0 = num_steps)
  weights: str = "likelihood"  # GARL/PAFT weights: likelihood w = p(y*|x,z) (paper) or a 0/1 verifier reward
  # Training reward (GRPO, and GARL/PAFT with weights="reward"; logged as reward/* by every estimator): a comma list
  # of reward functions `(completions, records, **columns) -> list[float]` run on the host between the rollout and
  # the update (train/scoring.py), each a name registered in tsallis_jax.rewards or a dotted path my_pkg.rewards:fn;
  # their weighted sum is the reward (TRL's reward_funcs / reward_weights). The default strict_match is the paper's
  # exact match against the gold answer, on strings (the text after `</think>` equals the gold answer).
  reward_funcs: str = "strict_match"
  reward_weights: str = ""  # comma floats, one per reward function ("" = all 1.0)
  baseline: str = "rloo"  # GARL: rloo (eq. 12, Algorithm 1) or none (plug-in eq. 9)
  normalize_mq: bool = True  # Algorithms 1-2 divide by M^q (equivalent to a q-dependent learning-rate rescaling)
  paft_resamples: int = 0  # PAFT's K; 0 means K = M, as in the paper's experiments
  num_samples: int = 8  # G = the paper's M, rationales per prompt in training (paper: 32)
  # GRPO (spec 2.6). The paper gives no clip or KL; we run one on-policy step per batch, so the PPO ratio is 1
  # and the clip is inactive; KL to the initial policy is logged always and added to the loss only if kl_coef > 0.
  # Names and semantics of TRL's GRPOConfig (trl/trainer/grpo_config.py, TRL 1.x, whose defaults are
  # scale_rewards="group" and loss_type="dapo"). scale_rewards: group = divide the advantages by the group's reward
  # std (GRPO); batch = by the std over the whole batch; none = no scaling (Dr. GRPO).
  grpo_scale_rewards: str = "group"
  # How per-token losses are aggregated (tsallis_jax.estimators.grpo): grpo = mean over sequences of each sequence's
  # token mean; bnpo = sum over tokens / completion tokens in the batch (TRL: the local per-device batch; here the
  # step's whole batch, micro-batches included); dapo = sum / completion tokens in the global batch, the same here;
  # dr_grpo = sum / (sequences x completion buffer length, TRL's max_completion_length); seq_sum = mean over
  # sequences of token sums (spec 2.6, not a TRL name). Our default stays "grpo" (TRL's is "dapo"); the README's
  # GRPO paragraph says why the demo's comparison with GARL is fair with it.
  grpo_loss_type: str = "grpo"
  grpo_clip_eps: float = 0.2
  kl_coef: float = 0.0
  log_ref_kl: bool = True  # keep the initial params to log kl/ref (one extra forward per step); forced on by kl_coef

  # -- sampling ------------------------------------------------------------------------------------------------
  temperature: float = 1.0  # training rollouts sample the policy itself: the estimators assume z ~ p_theta
  # Training rollouts must not be filtered: the step scores them under the unfiltered policy, so a top-k / top-p
  # filter would bias every estimator. Only 0 and 1.0 are accepted (eval_top_k / eval_top_p may filter).
  top_k: int = 0  # 0 = off
  top_p: float = 1.0
  eval_num_samples: int = 16  # p@1, pass@16, maj@16 (spec 1.7)
  eval_temperature: float = 1.0
  eval_top_k: int = 0
  eval_top_p: float = 1.0
  eval_reward: str = "substring_match"  # evaluation scorer (tsallis_jax.rewards); the paper uses substring match
  eval_every: int = 0  # steps between validation evaluations (0 = only at the end)
  # With eval_every > 0, also evaluate the initial model (step 0) on validation, as a candidate for the best
  # checkpoint (verl's val_before_train): training that only hurts then reports the initial model's test metrics.
  eval_at_start: bool = True
  eval_max_prompts: int = 0  # cap on validation/test prompts (0 = the whole split)
  eval_batch_size: int = 8  # prompts per evaluation rollout
  # Memory of the rollouts (neither changes the samples). rollout_chunk_rows: 0 = sample all B*G rows at once; r > 0
  # = in sequential chunks of r rows of whole prompts inside the one jitted rollout, so the KV cache holds r rows
  # (per device r / devices), training and evaluation alike: r must be a multiple of num_samples and of
  # eval_num_samples and divide batch_size*num_samples and eval_batch_size*eval_num_samples (and its prompts split
  # over the devices, check_mesh). kv_cache_dtype: "" = the compute dtype, or "float32" / "bfloat16" (a bfloat16
  # cache under float32 compute halves it; keys and values rounded to bfloat16 when written).
  rollout_chunk_rows: int = 0
  kv_cache_dtype: str = ""
  # rollout_unroll_layers: with model_overrides "scan_layers=true", rollouts decode with the layers unrolled (the
  # stacked weights sliced once per rollout; SamplingConfig.unroll_layers, which gives the CPU and H200 numbers): the
  # same samples, a longer rollout compile; for accelerators. False (default): the decode runs under the scan too.
  rollout_unroll_layers: bool = False
  # cpu_emitters: XLA:CPU's code generator for programs whose layers run under scan (`tsallis_jax.xla_cpu`; no effect
  # off CPU or for unrolled programs). auto = its older IR emitters for rollouts decoding under the scan (a shorter
  # compile, the run within the spread), XLA's default otherwise; xla = XLA's default everywhere; quick_compile = the
  # older emitters for the train step too (the shortest first step, a slower update every step: short CPU runs only).
  cpu_emitters: str = "auto"

  # -- optimisation ------------------------------------------------------------------------------------------
  batch_size: int = 4  # B, prompts per step (global, over all processes)
  num_steps: int = 100
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"  # after linear warm-up: constant | cosine | linear decay to 0
  optimizer: str = "adamw"  # adamw (default) | sgd (plain gradient descent, the setting of the paper's flow analysis)
  warmup_steps: int = 0
  weight_decay: float = 0.0  # AdamW
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_clip: float = 1.0  # global-norm clip (0 = off)
  # Memory of the train step (neither changes the gradient in exact arithmetic). micro_batch_prompts: 0 = one
  # forward/backward over all B*G sequences; m > 0 = accumulate gradients over B/m micro-batches of m prompts (each
  # with its G rollouts) in a `lax.scan`, so one micro-batch's activations live at a time. m must divide batch_size
  # and m * num_samples must split over the devices (check_mesh); not with grpo_scale_rewards="batch" (the std
  # would span the batch).
  # logprob_chunk: 0 = full N x T x V logits; c > 0 = log-probs and the entropy metric from hidden states, c
  # positions of the vocabulary projection at a time (`token_logprobs_from_hidden`).
  micro_batch_prompts: int = 0
  logprob_chunk: int = 0
  # share_prompt_forward: the forward (and backward) passes of the step run each prompt once, packed with its G
  # completions, which attend over its keys and values (`tsallis_jax.model.shared_prompt`): the same loss and
  # gradient as one pass over every full sequence (float32 summation order aside) for B*P + N*T token positions
  # instead of N*(P+T). False: one pass over every full sequence (the peers' way; the benchmark's ablation).
  share_prompt_forward: bool = True

  # -- mesh (tsallis_jax.distributed) ------------------------------------------------------------------------
  mesh_data: int = -1  # devices along the data axis (-1 = all devices not used by fsdp)
  mesh_fsdp: int = 1  # devices along the fsdp (parameter-sharding) axis

  # -- bookkeeping ---------------------------------------------------------------------------------------------
  log_every: int = 1  # metrics are computed every step; this is the JSONL/TensorBoard write period
  # Log `update_norm` (the global norm of the optimizer's update). Off by default: it makes XLA write the update out
  # and read it back, one more pass of the parameters' size per step (75 ms of the `smollm2` benchmark's 1.47 s
  # update on 2 CPU cores, measured; issue 17), and TRL, verl and tunix do not log it. `grad_norm` is always logged.
  update_norm_metric: bool = False
  checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
  max_to_keep: int = 3  # latest checkpoints kept (the best-by-validation checkpoint is kept separately)
  progress_bar: str = "auto"  # auto (only on a TTY) | on | off
  console_log: bool = True  # without a progress bar, one console line per written metrics row (off: the demo's runs)
  tensorboard: bool = True
  # Further metric backends, comma-separated (TRL's report_to): "wandb" (needs the wandb package; project from
  # $WANDB_PROJECT, run name = name), "tensorboard" (the same as tensorboard=True), "none" or "" (nothing more).
  report_to: str = ""
  log_completions: int = 8  # prompts per evaluation whose sampled completions go to completions.jsonl (0 = none)
  # JAX's persistent compilation cache (`compile_cache.py`): a re-run of the same programs reads them instead of
  # compiling. "" = leave JAX's setting; $JAX_COMPILATION_CACHE_DIR or an earlier jax.config setting wins.
  compile_cache: str = "~/.cache/tsallis_jax/xla"

  def __post_init__(self):
    _validate(self)

  # -- derived ---------------------------------------------------------------------------------------------------
  @property
  def resamples(self) -> int:
    """PAFT's K (spec 2.3); the paper's experiments use K = M."""
    return self.paft_resamples or self.num_samples

  def rollout_len(self, close_tag_len: int) -> int:
    """Tokens generated per rollout: rationale budget, the forced closing tag of `close_tag_len` tokens
    (`len(close_tag_ids)`), then the answer; the sampler's `SamplingConfig.completion_len`."""
    return self.rationale_budget + close_tag_len + self.max_answer_len

  def total_len(self, close_tag_len: int) -> int:
    """Length of a full sequence [prompt, rationale, closing tag, answer] (fixed buffers, one shape bucket)."""
    return self.max_prompt_len + self.rollout_len(close_tag_len)

  def replace(self, **changes: Any) -> "TrainConfig":
    """A copy with `changes` applied (validated; unknown keys rejected)."""
    _check_keys(changes)
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(keys) -> None:
  unknown = [k for k in keys if k not in FIELDS]
  if unknown:
    hints = {k: difflib.get_close_matches(k, FIELDS, n=1) for k in unknown}
    hint = "; ".join(f"{k!r}: did you mean {v[0]!r}?" for k, v in hints.items() if v)
    raise ConfigError(
        f"unknown config key(s) {unknown}. {hint + '. ' if hint else ''}Valid keys: {sorted(FIELDS)}")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _choice(cfg: TrainConfig, key: str, choices) -> None:
  value = getattr(cfg, key)
  _require(value in choices, f"{key}={value!r} is not one of {list(choices)}; set {key} to one of them")


def parse_options(text: str) -> dict[str, str]:
  """Parses "k=v,k=v" (used by `model_overrides` and `task_options`) into a dict of strings."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    _require("=" in item, f"option {item!r} in {text!r} is not of the form key=value")
    k, v = item.split("=", 1)
    out[k.strip()] = v.strip()
  return out


def reward_func_names(cfg: TrainConfig) -> list[str]:
  """`reward_funcs` as a list: registered names (tsallis_jax.rewards) or dotted paths `module:function`."""
  from tsallis_jax import rewards as rewards_lib
  names = [s.strip() for s in cfg.reward_funcs.split(",") if s.strip()]
  _require(bool(names), "reward_funcs is empty; name at least one reward function (the default is strict_match)")
  for name in names:
    _require(name in rewards_lib.REWARDS or ":" in name,
             f"reward_funcs entry {name!r} is neither registered ({sorted(rewards_lib.REWARDS)}) nor a dotted path"
             " module:function (e.g. my_pkg.rewards:my_reward)")
  return names


def reward_weight_values(cfg: TrainConfig) -> list[float]:
  """`reward_weights` as floats, one per reward function (all 1.0 when empty)."""
  count = len(reward_func_names(cfg))
  if not cfg.reward_weights.strip():
    return [1.0] * count
  try:
    weights = [float(s) for s in cfg.reward_weights.split(",")]
  except ValueError:
    raise ConfigError(f"reward_weights={cfg.reward_weights!r} is not a comma list of numbers") from None
  _require(len(weights) == count and all(math.isfinite(w) for w in weights),
           f"reward_weights={cfg.reward_weights!r} must hold {count} finite number(s), one per reward_funcs entry"
           f" ({cfg.reward_funcs!r})")
  return weights


def _validate(cfg: TrainConfig) -> None:
  # Types first, so that `--set` mistakes read clearly.
  for name, f in FIELDS.items():
    value = getattr(cfg, name)
    want = {"int": int, "float": (int, float), "str": str, "bool": bool}[f.type]
    ok = isinstance(value, want) and not (f.type in ("int", "float") and isinstance(value, bool))
    _require(ok, f"{name}={value!r} has type {type(value).__name__}; expected {f.type}")
  _choice(cfg, "estimator", ESTIMATORS)
  _choice(cfg, "q_schedule", Q_SCHEDULES)
  _choice(cfg, "lr_schedule", LR_SCHEDULES)
  _choice(cfg, "optimizer", ("adamw", "sgd"))
  _choice(cfg, "baseline", BASELINES)
  _choice(cfg, "weights", WEIGHTS)
  _choice(cfg, "prompt_style", PROMPT_STYLES)
  _choice(cfg, "dtype", DTYPES)
  _choice(cfg, "grpo_scale_rewards", SCALE_REWARDS)
  _choice(cfg, "grpo_loss_type", GRPO_LOSS_TYPES)
  _choice(cfg, "progress_bar", ("auto", "on", "off"))
  _choice(cfg, "chat_template", ("auto", "on", "off"))
  backends = [b.strip() for b in cfg.report_to.split(",") if b.strip()]
  _require(all(b in REPORT_TO for b in backends), f"report_to={cfg.report_to!r}: names are among {list(REPORT_TO)}")
  _require(not cfg.prompt_template or cfg.prompt_style == "warm",
           f"prompt_template is the warm prompt, but prompt_style={cfg.prompt_style!r} (a cold prompt is the bare"
           " context and question); set prompt_style=warm or drop prompt_template")
  reward_func_names(cfg)
  reward_weight_values(cfg)
  from tsallis_jax import rewards as rewards_lib
  _require(cfg.eval_reward in rewards_lib.REWARDS or ":" in cfg.eval_reward,
           f"eval_reward={cfg.eval_reward!r} is not one of {list(rewards_lib.REWARDS)} nor a dotted path"
           " module:function; set eval_reward to one of them")
  for key in ("q", "q_end"):
    v = getattr(cfg, key)
    _require(math.isfinite(v) and 0.0 <= v <= 1.0, f"{key}={v} is outside [0, 1]; commitment q lies in [0, 1]")
  _require(cfg.num_samples >= 1, f"num_samples={cfg.num_samples} must be >= 1")
  needs_two = cfg.estimator == "grpo" or (cfg.estimator == "garl" and cfg.baseline == "rloo")
  _require(not needs_two or cfg.num_samples >= 2,
           f"num_samples={cfg.num_samples} < 2 with estimator={cfg.estimator!r}"
           f"{' and baseline=rloo' if cfg.estimator == 'garl' else ''}: a leave-one-out or group baseline needs"
           " at least 2 samples per prompt; set num_samples >= 2 or baseline=none")
  _require(cfg.eval_num_samples >= 1, f"eval_num_samples={cfg.eval_num_samples} must be >= 1")
  for key in ("batch_size", "num_steps", "max_prompt_len", "max_answer_len", "eval_batch_size"):
    _require(getattr(cfg, key) >= 1, f"{key}={getattr(cfg, key)} must be >= 1")
  _require(cfg.rationale_budget >= 1, f"rationale_budget={cfg.rationale_budget}: budget forcing needs at least one"
           " rationale token before `</think>` is forced; set rationale_budget >= 1")
  _choice(cfg, "kv_cache_dtype", ("",) + DTYPES)
  _choice(cfg, "cpu_emitters", CPU_EMITTERS)
  if cfg.rollout_chunk_rows:
    r = cfg.rollout_chunk_rows
    _require(r > 0, f"rollout_chunk_rows={r} must be >= 0 (0 = all rows at once)")
    for samples, prompts, what in ((cfg.num_samples, cfg.batch_size, ""), (cfg.eval_num_samples,
                                                                            cfg.eval_batch_size, "eval_")):
      _require(r % samples == 0 and (prompts * samples) % r == 0,
               f"rollout_chunk_rows={r} must be a multiple of {what}num_samples={samples} (a chunk holds whole"
               f" prompts) and divide {what}batch_size x {what}num_samples = {prompts * samples} rows; choose e.g."
               f" {math.lcm(cfg.num_samples, cfg.eval_num_samples)} or 0 (all rows at once)")
  for key in ("micro_batch_prompts", "logprob_chunk"):
    _require(getattr(cfg, key) >= 0, f"{key}={getattr(cfg, key)} must be >= 0 (0 = off)")
  if cfg.micro_batch_prompts:
    _require(cfg.batch_size % cfg.micro_batch_prompts == 0,
             f"micro_batch_prompts={cfg.micro_batch_prompts} does not divide batch_size={cfg.batch_size}; set"
             " micro_batch_prompts to a divisor of batch_size (or 0 = no micro-batching)")
    _require(not (cfg.estimator == "grpo" and cfg.grpo_scale_rewards == "batch"),
             f"micro_batch_prompts={cfg.micro_batch_prompts} with grpo_scale_rewards='batch': the batch std spans"
             " all prompts, so micro-batches cannot reproduce it; use grpo_scale_rewards='group' or 'none', or"
             " micro_batch_prompts=0")
  for key in ("prompt_bucket", "paft_resamples", "q_schedule_steps", "warmup_steps", "eval_every", "eval_max_prompts",
              "checkpoint_every", "top_k", "eval_top_k", "log_completions"):
    _require(getattr(cfg, key) >= 0, f"{key}={getattr(cfg, key)} must be >= 0")
  _require(cfg.log_every >= 1, f"log_every={cfg.log_every} must be >= 1")
  _require(cfg.max_to_keep >= 1, f"max_to_keep={cfg.max_to_keep} must be >= 1 (the resume checkpoint)")
  for key in ("temperature", "eval_temperature"):
    v = getattr(cfg, key)
    _require(v > 0, f"{key}={v} must be > 0 (use a small value such as 1e-4 for near-greedy sampling)")
  for key in ("top_p", "eval_top_p"):
    v = getattr(cfg, key)
    _require(0.0 < v <= 1.0, f"{key}={v} must lie in (0, 1]")
  _require(cfg.top_k == 0 and cfg.top_p == 1.0,
           f"top_k={cfg.top_k}, top_p={cfg.top_p}: training rollouts would come from the top-k/top-p filtered policy"
           " while the train step scores them under the unfiltered one, which biases GARL, PAFT and GRPO; set"
           " top_k=0 and top_p=1.0 (filter evaluation samples with eval_top_k / eval_top_p instead)")
  _require(cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate} must be > 0")
  _require(cfg.warmup_steps <= cfg.num_steps,
           f"warmup_steps={cfg.warmup_steps} exceeds num_steps={cfg.num_steps}; lower warmup_steps")
  _require(0 <= cfg.adam_b1 < 1 and 0 <= cfg.adam_b2 < 1, "adam_b1 and adam_b2 must lie in [0, 1)")
  _require(cfg.weight_decay >= 0 and cfg.grad_clip >= 0 and cfg.kl_coef >= 0,
           "weight_decay, grad_clip and kl_coef must be >= 0")
  _require(cfg.grpo_clip_eps > 0, f"grpo_clip_eps={cfg.grpo_clip_eps} must be > 0")
  _require(cfg.mesh_fsdp >= 1 and (cfg.mesh_data == -1 or cfg.mesh_data >= 1),
           f"mesh_data={cfg.mesh_data}, mesh_fsdp={cfg.mesh_fsdp}: sizes are >= 1 (mesh_data may be -1 = fill)")
  _require(cfg.model in ("hf", "gguf") or not cfg.model_path,
           f"model_path={cfg.model_path!r} is only read when model is 'hf' or 'gguf' (model={cfg.model!r})")
  _require(cfg.model not in ("hf", "gguf") or bool(cfg.model_path),
           f"model={cfg.model!r} needs model_path (an HF folder or a .gguf file)")
  parse_options(cfg.model_overrides)
  parse_options(cfg.task_options)


def model_spec(cfg: TrainConfig):
  """The `tsallis_jax.model.build.ModelSpec` of a run: `model`, `model_path`, `dtype`, `model_overrides`, `seed`."""
  from tsallis_jax.model.build import ModelSpec
  return ModelSpec(cfg.model, cfg.model_path, cfg.dtype, tuple(parse_options(cfg.model_overrides).items()), cfg.seed)


def check_fits(cfg: TrainConfig, max_seq_len: int | None, close_tag_len: int) -> None:
  """Rejects budgets that do not fit the model's maximum length (spec 1.7: budget + answer within the window)."""
  if max_seq_len is not None and cfg.total_len(close_tag_len) > max_seq_len:
    raise ConfigError(
        f"max_prompt_len + rationale_budget + {close_tag_len} (`</think>`) + max_answer_len ="
        f" {cfg.total_len(close_tag_len)} exceeds the model's maximum"
        f" length {max_seq_len}; lower rationale_budget (the paper reserves 128 tokens for the answer) or the"
        " prompt length")


def check_mesh(cfg: TrainConfig, num_devices: int) -> tuple[int, int]:
  """Returns (data, fsdp) axis sizes, or raises when they do not divide the devices or the batch."""
  if num_devices % cfg.mesh_fsdp:
    raise ConfigError(f"mesh_fsdp={cfg.mesh_fsdp} does not divide the {num_devices} devices; choose a divisor")
  data = num_devices // cfg.mesh_fsdp if cfg.mesh_data == -1 else cfg.mesh_data
  if data * cfg.mesh_fsdp != num_devices:
    raise ConfigError(f"mesh_data={cfg.mesh_data} x mesh_fsdp={cfg.mesh_fsdp} = {data * cfg.mesh_fsdp} does not"
                      f" equal the {num_devices} devices; set mesh_data=-1 to fill")
  micro_rows = cfg.micro_batch_prompts * cfg.num_samples
  if micro_rows and micro_rows % num_devices:
    raise ConfigError(f"micro_batch_prompts x num_samples = {micro_rows} rows per micro-batch do not split over the"
                      f" {num_devices} devices (data x fsdp); make micro_batch_prompts x num_samples a multiple of"
                      f" {num_devices}")
  for samples in (cfg.num_samples, cfg.eval_num_samples):
    chunk_prompts = cfg.rollout_chunk_rows // samples
    if chunk_prompts % num_devices:
      raise ConfigError(f"rollout_chunk_rows={cfg.rollout_chunk_rows} rows hold {chunk_prompts} prompt(s) of"
                        f" {samples} samples, which do not split over the {num_devices} devices (data x fsdp); make"
                        f" rollout_chunk_rows a multiple of {samples * num_devices}")
  for key in ("batch_size", "eval_batch_size"):
    if getattr(cfg, key) % num_devices:
      raise ConfigError(f"{key}={getattr(cfg, key)} is not divisible by the {num_devices} devices the batch is split"
                        " over (data x fsdp); make it a multiple")
  return data, cfg.mesh_fsdp


def _parse_value(key: str, text: str) -> Any:
  kind = FIELDS[key].type
  try:
    if kind == "bool":
      low = text.strip().lower()
      if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return low in ("true", "1", "yes")
    if kind == "int":
      return int(text)
    if kind == "float":
      return float(text)
    return text
  except ValueError:
    raise ConfigError(f"--set {key}={text!r}: cannot parse {text!r} as {kind}") from None


# Names users bring from TRL's GRPOConfig and tunix, accepted by `--set` as aliases of the key with the same meaning.
ALIASES = {"num_generations": "num_samples", "beta": "kl_coef", "epsilon": "grpo_clip_eps", "max_steps": "num_steps"}


def resolve_alias(key: str, cfg: TrainConfig) -> str:
  """Our key for a TRL / tunix name (`ALIASES`); `max_completion_length` is rejected naming the keys to set."""
  if key == "max_completion_length":
    raise ConfigError(
        "max_completion_length (TRL) has no single equivalent: a completion here is rationale_budget + 1 (the forced"
        f" `</think>`) + max_answer_len tokens (now {cfg.rationale_budget} + 1 + {cfg.max_answer_len} ="
        f" {cfg.rollout_len(1)}); set rationale_budget (and max_answer_len) instead, e.g. rationale_budget=N-1-"
        f"{cfg.max_answer_len} for a total of N")
  return ALIASES.get(key, key)


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
  """Applies `["key=value", ...]` (the CLI's `--set`); unknown keys raise with the valid ones listed.

  TRL / tunix names in `ALIASES` (num_generations, beta, epsilon, max_steps) set our key of the same meaning."""
  changes = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = resolve_alias(key.strip(), cfg)
    _check_keys([key])
    changes[key] = _parse_value(key, text)
  return cfg.replace(**changes)


def _config_module(name: str):
  """The module of `name`: a file path (ends in .py or has a path separator) or a module of experiments/configs."""
  if name.endswith(".py") or "/" in name or os.sep in name:
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
      raise ConfigError(f"config file {name!r} does not exist; give a .py file defining get_config() or the name of a"
                        " module in experiments/configs")
    spec = importlib.util.spec_from_file_location(f"_tsallis_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  try:
    return importlib.import_module(f"experiments.configs.{name}")
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith("experiments.configs"):
      raise ConfigError(f"no config named {name!r}; configs live in experiments/configs/<name>.py (or pass a file"
                        " path)") from None
    raise


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
  """Loads the `get_config()` of `experiments/configs/<name>.py` (or of the file `name`) and applies `overrides`."""
  module = _config_module(name)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config {name!r} defines no get_config() returning a TrainConfig")
  cfg = module.get_config()
  if not isinstance(cfg, TrainConfig):
    raise ConfigError(f"{name}: get_config() returned {type(cfg).__name__}, not TrainConfig")
  return apply_overrides(cfg, overrides)
