"""`train_and_evaluate(config, workdir)`: the training loop, the same on a laptop CPU and a TPU pod.

Per step s (keys: k_s = fold_in(key, s); rollout and estimator keys split from k_s):
  1. the next prompt batch from the grain loader (each process reads its rows; global arrays over data x fsdp);
  2. one jitted rollout (the sampler; one compiled program per prompt-shape bucket) of G completions per prompt,
     then the rewards on the host: each process decodes its rows and runs `reward_funcs` (`scoring.py`);
  3. one jitted train step (`step.py`): weights, estimator, optax update; the state is donated;
  4. the metrics of step s-1 are fetched (never those of the step just dispatched), checked for NaN/inf on the host
     and written (JSONL, TensorBoard, progress bar);
  5. every `eval_every` steps: validation p@1 / pass@16 / maj@16, and the best checkpoint by validation maj@16;
     every `checkpoint_every` steps: a checkpoint of everything needed to resume bit-exactly.
At the end the test split is evaluated on the best checkpoint (the last one if no validation ran), as the paper does.

Start-up precedence (also in checkpoint.py): a readable checkpoint in `workdir/checkpoints` wins (resume); else
`init_checkpoint`; else the model's own initialisation / HF / GGUF weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tsallis_jax import distributed
from tsallis_jax.data import pipeline
from tsallis_jax.model import ModelConfig, abstract_model, create_model
from tsallis_jax.model.config import remat_policy_name
from tsallis_jax.sampler import generate_impl
from tsallis_jax.train import checkpoint as ckpt_lib
from tsallis_jax.train import evaluate as eval_lib
from tsallis_jax.train import completions as completions_lib
from tsallis_jax.train import preemption
from tsallis_jax.train import scoring
from tsallis_jax.train import state as state_lib
from tsallis_jax.train import workdir as workdir_lib
from tsallis_jax.train.config import ConfigError, TrainConfig, check_fits, check_mesh, parse_options
from tsallis_jax.train.schedules import make_optimizer
from tsallis_jax.train.step import BATCH_AXES, TokenIds, make_train_step
from tsallis_jax.train.tasks import Task, build_task
from tsallis_jax.train.writers import MetricWriter

log = logging.getLogger(__name__)

# Config keys that do not change any compiled program: runs that differ only in these share the jitted rollout and
# train step (the demo's many runs compile each program once).
_PROGRAM_NEUTRAL = ("name", "seed", "q", "q_end", "init_checkpoint", "eval_every", "eval_max_prompts",
                    "prompt_bucket", "checkpoint_every", "max_to_keep", "log_every", "progress_bar", "tensorboard",
                    "task_options", "data_dir", "eval_at_start", "report_to", "log_completions", "data_columns",
                    "prompt_template", "chat_template", "reward_funcs", "reward_weights", "eval_reward",
                    "console_log")
_PROGRAMS: dict[Any, Any] = {}


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN or inf; the message names the step, the batch and the last checkpoint."""


# ------------------------------------------------------------------------------------------------ model and mesh


_OVERRIDE_TYPES = {"int": int, "float": float, "str": str}


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
  """Parses `model_overrides` ("remat=true,attention_query_chunk=512") into typed ModelConfig changes.

  Applies to presets and to HF / GGUF checkpoints alike (e.g. remat and query-chunked attention for the paper runs).
  Only scalar fields can be overridden; "none" clears an optional one.
  """
  fields = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
  scalar = {k: t for k, t in fields.items() if t.split(" | ")[0] in ("bool", *_OVERRIDE_TYPES)}
  changes: dict[str, Any] = {}
  for k, text in parse_options(cfg.model_overrides).items():
    if k not in scalar:
      raise ConfigError(f"model_overrides key {k!r} is not a scalar ModelConfig field; valid: {sorted(scalar)}")
    kind, _, optional = scalar[k].partition(" | ")
    if k == "remat":  # a policy name, or the old true / false
      try:
        changes[k] = remat_policy_name(text)
      except ValueError as e:
        raise ConfigError(f"model_overrides {k}={text!r}: {e}") from None
    elif optional == "None" and text.lower() == "none":
      changes[k] = None
    elif kind == "bool":
      if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ConfigError(f"model_overrides {k}={text!r}: expected true or false")
      changes[k] = text.lower() in ("1", "true", "yes")
    else:
      try:
        changes[k] = _OVERRIDE_TYPES[kind](text)
      except ValueError:
        raise ConfigError(f"model_overrides {k}={text!r}: expected a {kind}") from None
  return changes


def model_config(cfg: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
  """The ModelConfig preset with `model_overrides` (and the task tokenizer's vocabulary for random-init models)."""
  presets = {"tiny": ModelConfig.tiny, "qwen3_0_6b": ModelConfig.qwen3_0_6b, "smollm2_135m": ModelConfig.smollm2_135m}
  if cfg.model not in presets:
    raise ConfigError(f"model={cfg.model!r} is not a preset {sorted(presets)} nor 'hf' / 'gguf'")
  changes: dict[str, Any] = {"dtype": cfg.dtype}
  if vocab_size is not None:
    changes["vocab_size"] = vocab_size
  changes.update(model_overrides(cfg))
  return presets[cfg.model](**changes)


def with_think_tokens(model: nnx.Module, tokenizer: Any, mesh) -> tuple[nnx.Module, Any]:
  """Adds `<think>` / `</think>` to a tokenizer that lacks them (SmolLM2) and grows the embedding to match.

  New rows are the mean of the existing embeddings (a neutral start); the tied LM head follows. Qwen3 has both tokens
  and is returned unchanged.
  """
  close = tokenizer.convert_tokens_to_ids("</think>")
  if close is not None and close != tokenizer.unk_token_id:
    return model, tokenizer
  tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
  old = model.config
  new_cfg = old.replace(vocab_size=max(len(tokenizer), old.vocab_size))
  params = state_lib.pure(nnx.state(model))
  embed = np.asarray(jax.device_get(params["embed"]))
  extra = np.repeat(embed.mean(0, keepdims=True), new_cfg.vocab_size - old.vocab_size, axis=0)
  params["embed"] = np.concatenate([embed, extra], axis=0)
  if not old.tie_embeddings:
    head = np.asarray(jax.device_get(params["lm_head"]))
    params["lm_head"] = np.concatenate([head, np.zeros((head.shape[0], extra.shape[0]), head.dtype)], axis=1)
  graphdef, _ = nnx.split(abstract_model(new_cfg))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params)), tokenizer


# `with_think_tokens` makes `</think>` one token of every loaded tokenizer (`tasks.Task.close_tag_ids` requires it).
THINK_CLOSE_LEN = 1


def load_model(cfg: TrainConfig, mesh) -> tuple[nnx.Module, Any]:
  """(model on the mesh, tokenizer or None): a preset with random init, an HF folder or Hub id, or a GGUF file."""
  if cfg.model == "hf":
    from tsallis_jax.model.hf_io import load_hf_checkpoint, load_tokenizer, read_hf_config
    from tsallis_jax.model.hub import resolve_model_path
    folder = resolve_model_path(cfg.model_path)  # a local folder wins; else an org/name Hub id via the cache
    check_fits(cfg, read_hf_config(folder).get("max_position_embeddings"), THINK_CLOSE_LEN)
    return with_think_tokens(load_hf_checkpoint(folder, dtype=cfg.dtype, mesh=mesh, **model_overrides(cfg)),
                             load_tokenizer(folder), mesh)
  if cfg.model == "gguf":
    from tsallis_jax.model import gguf_io
    from tsallis_jax.model.hf_io import load_hf_checkpoint, load_tokenizer, read_hf_config
    path = gguf_io.smollm2_gguf_path() if cfg.model_path == "smollm2" else cfg.model_path
    folder = gguf_io.cached_hf_folder(path)
    check_fits(cfg, read_hf_config(folder).get("max_position_embeddings"), THINK_CLOSE_LEN)
    return with_think_tokens(load_hf_checkpoint(folder, dtype=cfg.dtype, mesh=mesh, **model_overrides(cfg)),
                             load_tokenizer(folder), mesh)
  return None, None


# ------------------------------------------------------------------------------------------------ programs


@dataclasses.dataclass
class Programs:
  """The jitted functions of a run (shared by runs whose configs differ only in `_PROGRAM_NEUTRAL` keys)."""
  train_rollout: Any
  eval_rollout: Any
  train_step: Any
  state_shardings: state_lib.TrainState
  tx: Any


def _rollout_program(graphdef, sampling, mesh, params_sh):
  row = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  rep = state_lib.replicated(mesh)

  def fn(params, prompt_tokens_BxP, prompt_mask_BxP, key):
    return generate_impl(graphdef, params, prompt_tokens_BxP, prompt_mask_BxP, jax.random.wrap_key_data(key),
                         sampling)

  jitted = jax.jit(fn, in_shardings=(params_sh, row, row, rep))

  def run(params, prompt_tokens_BxP, prompt_mask_BxP, key):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    with jax.set_mesh(mesh):
      return jitted(params, prompt_tokens_BxP, prompt_mask_BxP, key)

  return run


def get_programs(cfg: TrainConfig, graphdef, abstract_vars, mesh, ids: TokenIds, rules) -> Programs:
  """The run's jitted programs, from the cache when an equivalent run built them already.

  `abstract_vars` is the model's nnx.State of Variables (their logical-axis metadata gives the shardings)."""
  key = (cfg.replace(**{k: TrainConfig.__dataclass_fields__[k].default for k in _PROGRAM_NEUTRAL}), graphdef, mesh,
         ids)
  if key in _PROGRAMS:
    return _PROGRAMS[key]
  tx = make_optimizer(cfg)
  with_ref = cfg.kl_coef > 0 or cfg.log_ref_kl
  state_sh = state_lib.state_shardings(abstract_vars, tx, mesh, rules, with_ref)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_lib.pure(abstract_vars))
  train_sampling = completions_lib.sampling_config(cfg, stop_ids=ids.stop_ids, pad_id=ids.pad_id,
                                               close_tag_ids=ids.close_tag_ids)
  eval_sampling = completions_lib.sampling_config(cfg, stop_ids=ids.stop_ids, pad_id=ids.pad_id,
                                              close_tag_ids=ids.close_tag_ids, evaluation=True)
  train_rollout = _rollout_program(graphdef, train_sampling, mesh, state_sh.params)
  eval_rollout = _rollout_program(graphdef, eval_sampling, mesh, state_sh.params)
  # The batch's structure (shapes vary by prompt bucket; shardings depend on ranks only).
  b, p, a = cfg.batch_size, cfg.max_prompt_len, cfg.max_answer_len
  abstract_rollout = jax.eval_shape(
      lambda params: generate_impl(graphdef, params, jnp.zeros((b, p), jnp.int32), jnp.ones((b, p), bool),
                                   jax.random.key(0), train_sampling), abstract_params)
  abstract_batch = {"rollout": abstract_rollout, "answer_tokens_BxA": jax.ShapeDtypeStruct((b, a), jnp.int32),
                    "answer_mask_BxA": jax.ShapeDtypeStruct((b, a), bool),
                    "rewards_BxG": jax.ShapeDtypeStruct((b, cfg.num_samples), jnp.float32)}
  step = make_train_step(cfg, graphdef, tx, ids, mesh, state_sh, abstract_batch)
  programs = Programs(train_rollout, eval_rollout, step, state_sh, tx)
  _PROGRAMS[key] = programs
  return programs


# ------------------------------------------------------------------------------------------------ helpers


def _put_rows(mesh, local: dict[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
  """Global arrays (rows over data x fsdp) from this process's rows."""
  spec = PartitionSpec(BATCH_AXES)
  return distributed.global_batch_from_local(local, mesh, jax.tree.map(lambda _: spec, local), global_rows)


def _fetch(tree: Any) -> dict[str, float]:
  """Host copies of replicated scalars (works on every process of a multi-host job)."""
  return {k: np.asarray(v.addressable_data(0)).item() for k, v in tree.items()}


def _step_keys(base_key: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
  k = jax.random.fold_in(jax.random.wrap_key_data(base_key), step)
  rollout_key, step_key = jax.random.split(k)
  return jax.random.key_data(rollout_key), jax.random.key_data(step_key)


def _is_finite(metrics: dict[str, float]) -> bool:
  return all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm"))


# ------------------------------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class Setup:
  """What a run needs before its state: mesh, task, model shapes and the compiled programs."""
  cfg: TrainConfig
  mesh: Any
  task: Task
  ids: TokenIds
  model_config: ModelConfig
  graphdef: Any
  abstract_params: Any
  programs: Programs
  model: Any = None  # the loaded HF / GGUF model, if any (its params start a fresh run)


def setup(cfg: TrainConfig, task: Task | None = None) -> Setup:
  mesh = distributed.make_mesh(dict(zip(BATCH_AXES, check_mesh(cfg, jax.device_count()))))
  model, tokenizer = load_model(cfg, mesh)
  task = task or build_task(cfg, tokenizer)
  ids = TokenIds(stop_ids=task.stop_ids, pad_id=task.pad_id, close_tag_ids=task.close_tag_ids)
  if model is None:
    mcfg = model_config(cfg, vocab_size=len(task.tokenizer))
    graphdef, abstract_vars = nnx.split(abstract_model(mcfg, seed=cfg.seed))
  else:
    mcfg = model.config
    graphdef, abstract_vars = nnx.split(model)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_lib.pure(abstract_vars))
  programs = get_programs(cfg, graphdef, abstract_vars, mesh, ids, mcfg.sharding_rules)
  return Setup(cfg, mesh, task, ids, mcfg, graphdef, abstract_params, programs, model)


def initial_params(s: Setup) -> Any:
  """Params of a fresh run: `init_checkpoint`, else the loaded HF / GGUF model, else a random initialisation."""
  if s.cfg.init_checkpoint:
    return ckpt_lib.load_params(s.cfg.init_checkpoint, jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.abstract_params,
        s.programs.state_shardings.params))
  if s.model is not None:
    return state_lib.pure(nnx.state(s.model))
  return state_lib.pure(nnx.state(create_model(s.model_config, seed=s.cfg.seed, mesh=s.mesh)))


def evaluate_split(s: Setup, params: Any, records, prefix: str, step: int,
                   writer: MetricWriter | None = None) -> dict[str, float]:
  """`{prefix}/p@1`, `{prefix}/pass@k`, `{prefix}/maj@k` of `params` on `records` (evaluation sampling settings);
  with a `writer`, the first `log_completions` prompts' samples go to its completions.jsonl."""
  cfg = s.cfg

  def put(arrays):
    return _put_rows(s.mesh, {k: v[_eval_rows(v, s.mesh)] for k, v in arrays.items()}, cfg.eval_batch_size)

  key = jax.random.fold_in(jax.random.key(cfg.seed + 1_000_003), step)
  metrics, completions = eval_lib.evaluate(
      s.programs.eval_rollout, params, records, s.task.tokenizer, style=cfg.prompt_style,
      max_prompt_len=cfg.max_prompt_len, pad_id=s.ids.pad_id, batch_size=cfg.eval_batch_size,
      num_samples=cfg.eval_num_samples, key=key, put=put, reward_name=cfg.eval_reward)
  if writer is not None and cfg.log_completions:
    writer.completions(step, prefix, eval_lib.completion_rows(records, completions, reward_name=cfg.eval_reward,
                                                              max_prompts=cfg.log_completions))
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


def train_and_evaluate(cfg: TrainConfig, workdir: str | os.PathLike, *, task: Task | None = None,
                       observe: Callable[[int, Any], None] | None = None) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the final validation / test metrics.

  `observe(step, params)`, if given, is called with the starting params and after every step (the demo's per-prompt
  probe); it must not keep `params` (the next step donates them).

  Writes `workdir/config.json`, `metrics.jsonl` (one row per step, plus eval rows), TensorBoard events,
  `checkpoints/`, `best/` and `results.json` (process 0 writes files; every process writes its checkpoint shards).
  `workdir` is a local folder or an object-store URI such as `gs://bucket/run` (see `checkpoint.resolve_workdir`).
  Raises `workdir.WorkdirError` when another run holds the workdir or it cannot be written, and `preemption.Preempted`
  after a preemption notice (SIGTERM, or JAX's sync point on a multi-host job), once the current step is saved.
  """
  workdir = ckpt_lib.resolve_workdir(workdir)
  # One run per workdir, a write probe first; a preemption notice ends the run at a step boundary (`Preempted`).
  with workdir_lib.hold(workdir), preemption.Watcher() as watcher:
    return _train(cfg, workdir, task, watcher, observe)


def _train(cfg: TrainConfig, workdir, task: Task | None, watcher: preemption.Watcher,
           observe: Callable[[int, Any], None] | None) -> dict[str, Any]:
  s = setup(cfg, task)
  mesh, task, programs = s.mesh, s.task, s.programs
  reward_funcs = scoring.RewardFuncs.from_config(cfg)  # imports user reward modules now: a missing one fails early
  abstract_params = s.abstract_params
  state_sh = programs.state_shardings
  with_ref = state_sh.ref_params is not None

  # -- state: resume > init_checkpoint > fresh --------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.max_to_keep)
  abstract_state = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      jax.eval_shape(lambda p: state_lib.TrainState(
          step=jnp.zeros((), jnp.int32), params=p, opt_state=programs.tx.init(p),
          key=jnp.zeros((2,), jnp.uint32), ref_params=p if with_ref else None), abstract_params),
      state_sh)
  if distributed.is_main_process():
    workdir_lib.check_free_space(workdir, 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))
  restored = checkpointer.restore(abstract_state)
  meta: dict[str, Any] = {}
  if restored is not None:
    start_step, state, meta = restored
    if cfg.init_checkpoint:
      log.info("resuming from %s step %d; init_checkpoint %s is ignored", workdir, start_step, cfg.init_checkpoint)
  else:
    start_step = 0
    state = state_lib.init_state(initial_params(s), programs.tx, cfg.seed, state_sh, with_ref)
  s.model = None

  # -- data -------------------------------------------------------------------------------------------------
  rows = distributed.host_batch_slice(cfg.batch_size, mesh, BATCH_AXES)
  per_host = rows.stop - rows.start
  shard_index, shard_count = rows.start // per_host, cfg.batch_size // per_host
  loader = pipeline.make_prompt_loader(
      task.train, task.tokenizer, batch_size=cfg.batch_size, seed=cfg.seed, style=cfg.prompt_style,
      max_prompt_tokens=cfg.max_prompt_len, max_answer_tokens=cfg.max_answer_len, shard_index=shard_index,
      shard_count=shard_count, pad_multiple=cfg.prompt_bucket or cfg.max_prompt_len)
  data_iter = iter(loader)
  if meta.get("data_state") is not None:
    data_iter.set_state(meta["data_state"])
  best = meta.get("best", {"metric": None, "step": None})

  main = distributed.is_main_process()
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
  writer = MetricWriter(workdir, tensorboard=cfg.tensorboard, progress_bar=cfg.progress_bar,
                        total_steps=cfg.num_steps, start_step=start_step,
                        keep_through_step=start_step if restored is not None else -1, report_to=cfg.report_to,
                        run_name=cfg.name, config=cfg.to_dict(), console_log=cfg.console_log)
  if restored is not None:
    writer.note(f"resumed from step {start_step} of {workdir}")
  q_range = jnp.asarray([cfg.q, cfg.q_end], jnp.float32)
  val_records = task.val[:cfg.eval_max_prompts or None]
  test_records = task.test[:cfg.eval_max_prompts or None]

  def run_eval(params, records, prefix, step):
    return evaluate_split(s, params, records, prefix, step, writer)

  def checkpoint_meta(step: int) -> dict[str, Any]:
    return {"step": step, "data_state": data_iter.get_state(), "best": best, "config": cfg.to_dict()}

  last_good = checkpointer.latest_step()
  pending: tuple[int, Any, np.ndarray] | None = None
  t_last = time.perf_counter()

  def flush(pending_item):
    """Fetches, checks and writes the metrics of a dispatched step."""
    nonlocal t_last
    step_done, metrics_dev, index_B = pending_item
    metrics = _fetch(metrics_dev)
    now = time.perf_counter()
    metrics["perf/tokens_per_s"] = metrics["gen/tokens"] / max(now - t_last, 1e-9)
    metrics["perf/step_s"] = now - t_last
    t_last = now
    if not _is_finite(metrics):
      where = (f"last good checkpoint: step {last_good} in {checkpointer.latest.directory}" if last_good is not None
               else "no checkpoint was written yet")
      raise NonFiniteLossError(
          f"non-finite loss={metrics['loss']} / grad_norm={metrics['grad_norm']} in the update to step {step_done}"
          f" (batch record ids {index_B.tolist()}); {where}. Lower the learning rate or check the weights (jq/*).")
    if step_done % cfg.log_every == 0 or step_done == cfg.num_steps:
      writer.write(step_done, metrics)
    writer.progress(step_done, metrics)

  if observe is not None:
    observe(start_step, state.params)
  if start_step == 0 and cfg.eval_every and cfg.eval_at_start and val_records:
    value = _eval_for_best(run_eval(state.params, val_records, "eval", 0), writer, cfg, 0)
    best = {"metric": value, "step": 0}
    checkpointer.save(0, state, checkpoint_meta(0), best=True)
    t_last = time.perf_counter()

  for step in range(start_step, cfg.num_steps):
    batch_np = next(data_iter)
    batch = _put_rows(mesh, {k: v for k, v in batch_np.items() if k != "index_B"}, cfg.batch_size)
    rollout_key, step_key = _step_keys(state.key, step)
    rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
    rewards_BxG = scoring.rollout_rewards(reward_funcs, rollout, [task.train[i] for i in batch_np["index_B"]],
                                          task.tokenizer, mesh, cfg.batch_size)
    train_batch = {"rollout": rollout, "answer_tokens_BxA": batch["answer_tokens_BxA"],
                   "answer_mask_BxA": batch["answer_mask_BxA"], "rewards_BxG": rewards_BxG}
    state, metrics_dev = programs.train_step(state, train_batch, step_key, q_range)
    if pending is not None:
      flush(pending)
    pending = (step + 1, metrics_dev, batch_np["index_B"])
    done = step + 1
    if observe is not None:
      observe(done, state.params)
    do_eval = cfg.eval_every and done % cfg.eval_every == 0
    do_ckpt = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.num_steps
    if do_eval or do_ckpt:
      flush(pending)
      pending = None
    if do_eval and val_records:
      value = _eval_for_best(run_eval(state.params, val_records, "eval", done), writer, cfg, done)
      if best["metric"] is None or value > best["metric"]:
        best = {"metric": value, "step": done}
        checkpointer.save(done, state, checkpoint_meta(done), best=True)
      t_last = time.perf_counter()
    if do_ckpt:
      checkpointer.save(done, state, checkpoint_meta(done))
      last_good = done
      t_last = time.perf_counter()
    if done < cfg.num_steps and watcher.requested(done):  # a preemption notice: save this step, flush, stop
      if pending is not None:
        flush(pending)
      checkpointer.save(done, state, checkpoint_meta(done))  # a no-op when this step was just saved
      writer.close()
      checkpointer.close()
      raise preemption.Preempted(done, workdir)
  if pending is not None:
    flush(pending)

  # -- final: test split on the best checkpoint (or the last state) ---------------------------------------------
  results: dict[str, Any] = {"name": cfg.name, "steps": cfg.num_steps, "best": best}
  final_params = state.params
  if best["step"] is not None:
    best_state = checkpointer.restore(abstract_state, best=True)
    if best_state is not None:
      final_params = best_state[1].params
  if test_records:
    results.update(run_eval(final_params, test_records, "test", cfg.num_steps))
    writer.write(cfg.num_steps, {k: v for k, v in results.items() if k.startswith("test/")})
  writer.close()
  checkpointer.close()
  if main:
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def _eval_for_best(eval_metrics: dict[str, float], writer: MetricWriter, cfg: TrainConfig, step: int) -> float:
  """Writes a validation result; returns the value that picks the best checkpoint (maj@k, as the paper)."""
  writer.write(step, eval_metrics)
  return eval_metrics[f"eval/maj@{cfg.eval_num_samples}"]


def _eval_rows(v: np.ndarray, mesh) -> slice:
  """This process's rows of an evaluation batch that every process built whole."""
  return distributed.host_batch_slice(v.shape[0], mesh, BATCH_AXES)
