"""The compiled programs of a run: the jitted training rollout, evaluation rollout and train step, built once.

`build_programs(cfg, graphdef, abstract_vars, mesh, ids, rules)` returns a `Programs` value that the run holds and
passes where it is needed; nothing is cached behind the caller's back. Runs whose configs differ only in keys that
change no compiled program (`PROGRAM_NEUTRAL`: the seed, q, logging, evaluation schedule, rewards, ...) can share
one `Programs`: pass it to `train_and_evaluate(..., programs=...)` (the demo trains 24 runs on three of them);
`Programs.check` rejects a value built for another program-relevant config, naming the keys that differ.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tsallis_jax import xla_cpu
from tsallis_jax.sampler import generate_impl
from tsallis_jax.train import completions as completions_lib
from tsallis_jax.train import state as state_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.schedules import make_optimizer
from tsallis_jax.train.step import BATCH_AXES, TokenIds, make_train_step

# Config keys that do not change any compiled program: runs that differ only in these can share one `Programs`
# (q and q_end enter the step as arguments; the seed only through the state's key).
PROGRAM_NEUTRAL = ("name", "seed", "q", "q_end", "init_checkpoint", "eval_every", "eval_max_prompts",
                   "prompt_bucket", "checkpoint_every", "max_to_keep", "log_every", "progress_bar", "tensorboard",
                   "task_options", "data_dir", "eval_at_start", "report_to", "log_completions", "data_columns",
                   "prompt_template", "chat_template", "reward_funcs", "reward_weights", "eval_reward",
                   "console_log", "compile_cache")


def program_key(cfg: TrainConfig, graphdef, mesh, ids: TokenIds) -> tuple:
  """What the compiled programs depend on: the config without its `PROGRAM_NEUTRAL` keys, the model's graph, the
  mesh and the special token ids."""
  neutral = cfg.replace(**{k: TrainConfig.__dataclass_fields__[k].default for k in PROGRAM_NEUTRAL})
  return (neutral, graphdef, mesh, ids)


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted functions of a run, the state's shardings and the optimizer they were built for.

  train_rollout / eval_rollout  (params, prompt_tokens_BxP, prompt_mask_BxP, key) -> Rollout (typed PRNG key)
  train_step                    (state, batch, key, q_range) -> (state, metrics), the state donated
  """
  train_rollout: Callable
  eval_rollout: Callable
  train_step: Callable
  state_shardings: state_lib.TrainState
  tx: Any
  key: tuple = dataclasses.field(repr=False, compare=False)

  def check(self, cfg: TrainConfig, graphdef, mesh, ids: TokenIds) -> None:
    """Raises ValueError when these programs were built for another program-relevant config, model, mesh or ids."""
    want = program_key(cfg, graphdef, mesh, ids)
    if want == self.key:
      return
    differ = [f.name for f in dataclasses.fields(TrainConfig)
              if getattr(want[0], f.name) != getattr(self.key[0], f.name)]
    parts = ([f"config keys {differ}"] if differ else []) + [
        name for name, a, b in zip(("the model graph", "the mesh", "the token ids"), want[1:], self.key[1:]) if a != b]
    raise ValueError(f"the programs passed in were built for another run ({', '.join(parts)} differ); build them "
                     "for this config (loop.setup(cfg).programs) or pass none")


def _rollout_program(graphdef, sampling, mesh, params_sh, compiler_options):
  row = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  rep = state_lib.replicated(mesh)

  def fn(params, prompt_tokens_BxP, prompt_mask_BxP, key):
    return generate_impl(graphdef, params, prompt_tokens_BxP, prompt_mask_BxP, key, sampling)

  jitted = jax.jit(fn, in_shardings=(params_sh, row, row, rep), compiler_options=compiler_options)

  def run(params, prompt_tokens_BxP, prompt_mask_BxP, key):
    with jax.set_mesh(mesh):
      return jitted(params, prompt_tokens_BxP, prompt_mask_BxP, key)

  run.jitted = jitted  # for ahead-of-time lowering (train/memory.py)
  return run


def build_programs(cfg: TrainConfig, graphdef, abstract_vars, mesh, ids: TokenIds, rules) -> Programs:
  """Jits the run's rollouts and train step with explicit shardings (compiled on first call), with XLA:CPU's
  compile options for each (`TrainConfig.cpu_emitters`, `tsallis_jax.xla_cpu`).

  `abstract_vars` is the model's nnx.State of Variables (their logical-axis metadata gives the shardings)."""
  tx = make_optimizer(cfg)
  scan_layers = nnx.merge(graphdef, abstract_vars).config.scan_layers
  options = xla_cpu.program_options(cfg.cpu_emitters, scan_layers=scan_layers,
                                    unroll_decode=cfg.rollout_unroll_layers, platform=xla_cpu.platform_of(mesh))
  with_ref = cfg.kl_coef > 0 or cfg.log_ref_kl
  state_sh = state_lib.state_shardings(abstract_vars, tx, mesh, rules, with_ref)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_lib.pure(abstract_vars))
  train_sampling = completions_lib.sampling_config(cfg, stop_ids=ids.stop_ids, pad_id=ids.pad_id,
                                                   close_tag_ids=ids.close_tag_ids)
  eval_sampling = completions_lib.sampling_config(cfg, stop_ids=ids.stop_ids, pad_id=ids.pad_id,
                                                  close_tag_ids=ids.close_tag_ids, evaluation=True)
  train_rollout = _rollout_program(graphdef, train_sampling, mesh, state_sh.params, options["rollout"])
  eval_rollout = _rollout_program(graphdef, eval_sampling, mesh, state_sh.params, options["rollout"])
  # The batch's structure (shapes vary by prompt bucket; shardings depend on ranks only).
  b, p, a = cfg.batch_size, cfg.max_prompt_len, cfg.max_answer_len
  abstract_rollout = jax.eval_shape(
      lambda params: generate_impl(graphdef, params, jnp.zeros((b, p), jnp.int32), jnp.ones((b, p), bool),
                                   jax.random.key(0), train_sampling), abstract_params)
  abstract_batch = {"rollout": abstract_rollout, "answer_tokens_BxA": jax.ShapeDtypeStruct((b, a), jnp.int32),
                    "answer_mask_BxA": jax.ShapeDtypeStruct((b, a), bool),
                    "rewards_BxG": jax.ShapeDtypeStruct((b, cfg.num_samples), jnp.float32)}
  step = make_train_step(cfg, graphdef, tx, ids, mesh, state_sh, abstract_batch, compiler_options=options["train_step"])
  return Programs(train_rollout, eval_rollout, step, state_sh, tx, key=program_key(cfg, graphdef, mesh, ids))
