"""tunix (JAX) on a benchmark workload: its GRPOLearner step, or its vanilla Sampler. Runs in the tunix venv.

  $PEERS_HOME/tunix/bin/python tunix_runner.py --workload DIR --mode grpo|sample [--steps N] [--beta B]

Adapted from ../shared/bench/tunix_grpo_tiny.py (the reference scripts), generalised to read the shapes from
`workload.json` and to load a Llama-shaped checkpoint (SmolLM2) with tunix's Llama3 family. Fixes tunix 0.1.7 needs
on JAX 0.10: a mesh with Auto axis types, prompts as a numpy array, `PreTrainedTokenizerFast` loaded explicitly.
Step boundaries are the moments the learner pulls a batch; step 0 (compile) is excluded from the medians.
"""
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402


def model_lib_and_config(folder):
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  common_kw = dict(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
                   hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                   num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]),
                   norm_eps=hf["rms_norm_eps"])
  if hf["model_type"] == "qwen2":
    from tunix.models.qwen2 import model as lib, params
    cfg = lib.ModelConfig(**common_kw, use_tied_embedding=hf["tie_word_embeddings"], dtype=jnp.float32,
                          param_dtype=jnp.float32)
  elif hf["model_type"] == "llama":
    # tunix's Llama3 family: plain RoPE (split halves, no llama3 scaling), GQA, tied embeddings via weight_tying.
    # tunix 0.1.7's Llama3 Attention calls apply_rope without the config's rope_theta (it falls back to 1e6);
    # SmolLM2 needs 1e5, so bind it here (same FLOPs either way; this makes the logits match transformers').
    import functools
    from tunix.models.llama3 import model as lib, params
    cfg = lib.ModelConfig(**common_kw, weight_tying=hf["tie_word_embeddings"])
    if not isinstance(lib.apply_rope, functools.partial):
      lib.apply_rope = functools.partial(lib.apply_rope, rope_theta=cfg.rope_theta)
  else:
    raise SystemExit(f"no tunix family for model_type {hf['model_type']!r}")
  return params, cfg


def make_mesh():
  return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def load_model(folder, mesh):
  params, cfg = model_lib_and_config(folder)
  return params.create_model_from_safe_tensors(folder, cfg, mesh=mesh, dtype=jnp.float32), cfg


def load_tokenizer(folder):
  tok = PreTrainedTokenizerFast.from_pretrained(folder)
  tok.padding_side = "left"
  return tok


def sanity_logits(model):
  n = len(common.SANITY_IDS)
  toks = jnp.array([common.SANITY_IDS], jnp.int32)
  logits, _ = model(toks, jnp.arange(n)[None], None, jnp.tril(jnp.ones((1, n, n), bool)))
  return np.asarray(logits[0, -1, :5])


def run_sample(args, spec, folder):
  from tunix.generate import sampler as sampler_lib
  mesh = make_mesh()
  tok = load_tokenizer(folder)
  prompts, _ = common.read_prompts(folder)
  with mesh:
    model, cfg = load_model(folder, mesh)
  sanity = sanity_logits(model)
  sampler = sampler_lib.Sampler(model, tok, sampler_lib.CacheConfig(
    cache_size=spec["prompt_len"] + spec["max_new"], num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim))
  batch = [prompts[i % len(prompts)] for i in range(spec["sample_batch"])]
  times = []
  for s in range(common.steps_for(args, spec)):
    t0 = time.perf_counter()
    out = sampler(input_strings=batch, max_generation_steps=spec["max_new"], max_prompt_length=spec["prompt_len"],
                  temperature=1.0, top_p=1.0, top_k=None, seed=s, echo=False)
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - t0)
  common.emit(system="tunix", version=version(), spec=spec, mode="sample", times_s=times,
              tokens_per_step=spec["sample_batch"] * spec["max_new"], sanity=sanity,
              extra={"sampler": "tunix.generate.sampler.Sampler (vanilla)"})


def run_grpo(args, spec, folder):
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner as grpo_lib
  from tunix.rl.rollout import base_rollout
  beta = spec["beta"] if args.beta is None else args.beta
  steps = common.steps_for(args, spec)
  mesh = make_mesh()
  tok = load_tokenizer(folder)
  prompts, reward_token = common.read_prompts(folder)
  with mesh:
    actor, _ = load_model(folder, mesh)
    reference = load_model(folder, mesh)[0] if beta != 0.0 else None
  sanity = sanity_logits(actor)
  cluster_config = rl_cluster_lib.ClusterConfig(
    role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                  rl_cluster_lib.Role.ROLLOUT: mesh},
    rollout_engine="vanilla", offload_to_cpu=False,
    training_config=rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                  optax.adamw(spec["learning_rate"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)),
      eval_every_n_steps=10**9, max_steps=steps, mini_batch_size=None, train_micro_batch_size=None,
      rollout_micro_batch_size=None, compute_logps_micro_batch_size=None, pbar_description=None),
    rollout_config=base_rollout.RolloutConfig(
      max_tokens_to_generate=spec["max_new"], max_prompt_length=spec["prompt_len"],
      kv_cache_size=spec["prompt_len"] + spec["max_new"], temperature=1.0, top_p=1.0, top_k=None),
  )
  with mesh:
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok,
                                       cluster_config=cluster_config)
  algo = grpo_lib.GRPOConfig(num_generations=spec["group_size"], num_iterations=1, beta=beta, epsilon=0.2,
                             loss_agg_mode="sequence-mean-token-mean", kl_loss_mode="low_var_kl")
  rewards_seen = []

  def reward_fn(prompts, completions, **kwargs):
    r = common.reward_contains(reward_token, completions)
    rewards_seen.append(sum(r))
    return r

  learner = grpo_lib.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=reward_fn)
  phases = {"generate": [], "ref_logps": [], "update_actor": []}

  def wrap(obj, name, key):
    fn = getattr(obj, name)

    def timed(*a, **k):
      t0 = time.perf_counter()
      out = fn(*a, **k)
      try:
        jax.block_until_ready(out)
      except Exception:  # pylint: disable=broad-except  (outputs that hold non-arrays)
        pass
      phases[key].append(time.perf_counter() - t0)
      return out
    setattr(obj, name, timed)

  wrap(cluster, "generate", "generate")
  wrap(cluster, "get_ref_per_token_logps", "ref_logps")
  wrap(cluster, "update_actor", "update_actor")
  pulls = []
  batch = np.array(prompts[:spec["num_prompts"]])

  def dataset():
    while True:
      pulls.append(time.perf_counter())
      yield {"prompts": batch}

  with mesh:
    learner.train(dataset())
  jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
  t_end = time.perf_counter()
  starts = pulls[:steps]
  times = [e - s for s, e in zip(starts, starts[1:] + [t_end])]
  common.emit(system="tunix", version=version(), spec=spec, mode="grpo", times_s=times,
              tokens_per_step=spec["num_prompts"] * spec["group_size"] * spec["max_new"], phases=phases, sanity=sanity,
              extra={"beta": beta, "rewards_per_step": rewards_seen})


def version():
  import importlib.metadata as md
  return f"google-tunix {md.version('google-tunix')}, jax {jax.__version__}"


def main():
  args = common.parse_args()
  spec = common.read_spec(args.workload)
  print("tunix runner:", version(), "devices", jax.devices(), flush=True)
  (run_sample if args.mode == "sample" else run_grpo)(args, spec, args.workload)


if __name__ == "__main__":
  main()
