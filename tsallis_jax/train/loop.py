"""`train_and_evaluate(config, workdir)`: the training loop, the same on a laptop CPU and a TPU pod.

The story of a run, top to bottom:
  setup      the mesh, the model (`model.build.build_model`), the task, the token ids and the compiled programs
             (`programs.build_programs`, or the `programs=` a caller passes to share them between runs); a frozen
             `Setup` plus the loaded HF / GGUF params, which only the initial state keeps;
  state      resume from `workdir` > `init_checkpoint` > the model's weights (typed PRNG key `jax.random.key(seed)`);
  steps      below; then the final test evaluation.

Per step s (keys: k_s = fold_in(key, s); rollout and estimator keys split from k_s):
  1. the next prompt batch from the grain loader (each process reads its rows; global arrays over data x fsdp);
  2. one jitted rollout (the sampler; one compiled program per prompt-shape bucket) of G completions per prompt,
     then the rewards on the host: each process decodes its rows and runs `reward_funcs` (`scoring.py`);
  3. one jitted train step (`step.py`): weights, estimator, optax update; the state is donated (at the first step
     its compile starts in a background thread before the rollout, `compile_ahead.py`, and runs beside it);
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
from jax.sharding import PartitionSpec

from tsallis_jax import distributed
from tsallis_jax.data import pipeline
from tsallis_jax.model import ModelConfig, create_model
from tsallis_jax.model.build import build_model, max_positions
from tsallis_jax.train import checkpoint as ckpt_lib
from tsallis_jax.train import compile_cache
from tsallis_jax.train import evaluate as eval_lib
from tsallis_jax.train import preemption
from tsallis_jax.train import scoring
from tsallis_jax.train import state as state_lib
from tsallis_jax.train import workdir as workdir_lib
from tsallis_jax.train.config import TrainConfig, check_fits, check_mesh, model_spec
from tsallis_jax.train.programs import Programs, build_programs
from tsallis_jax.train.step import BATCH_AXES, TokenIds
from tsallis_jax.train.tasks import Task, build_task
from tsallis_jax.train.writers import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN or inf; the message names the step, the batch and the last checkpoint."""


# ------------------------------------------------------------------------------------------------ helpers


def _put_rows(mesh, local: dict[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
  """Global arrays (rows over data x fsdp) from this process's rows."""
  spec = PartitionSpec(BATCH_AXES)
  return distributed.global_batch_from_local(local, mesh, jax.tree.map(lambda _: spec, local), global_rows)


def _fetch(tree: Any) -> dict[str, float]:
  """Host copies of replicated scalars (works on every process of a multi-host job)."""
  return {k: np.asarray(v.addressable_data(0)).item() for k, v in tree.items()}


def _step_keys(key: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
  """(rollout key, step key) of step `step`: split from fold_in(key, step); typed keys in and out."""
  rollout_key, step_key = jax.random.split(jax.random.fold_in(key, step))
  return rollout_key, step_key


def _is_finite(metrics: dict[str, float]) -> bool:
  return all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm"))


# ------------------------------------------------------------------------------------------------ the loop


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run needs before its state: mesh, task, token ids, model shapes and the compiled programs."""
  cfg: TrainConfig
  mesh: Any
  task: Task
  ids: TokenIds
  model_config: ModelConfig
  graphdef: Any
  abstract_params: Any
  programs: Programs


def setup(cfg: TrainConfig, task: Task | None = None, programs: Programs | None = None) -> tuple[Setup, Any]:
  """(Setup, pretrained params): the mesh, the model (`model.build.build_model`), the task and the programs
  (`programs` if given, checked against `cfg`; else built). The params are the loaded HF / GGUF weights, or None for
  a preset; the model object is not kept (`initial_params` takes them, then the caller drops them). Turns on the
  persistent compilation cache of `cfg.compile_cache` (`compile_cache.enable`)."""
  compile_cache.enable(cfg.compile_cache)
  mesh = distributed.make_mesh(dict(zip(BATCH_AXES, check_mesh(cfg, jax.device_count()))))
  spec = model_spec(cfg)
  if spec.pretrained:
    model, tokenizer = build_model(spec, mesh)
    task = task or build_task(cfg, tokenizer)
  else:
    task = task or build_task(cfg)
    model, _ = build_model(spec, mesh, tokenizer=task.tokenizer, abstract=True)
  ids = TokenIds(stop_ids=task.stop_ids, pad_id=task.pad_id, close_tag_ids=task.close_tag_ids)
  check_fits(cfg, max_positions(spec), len(ids.close_tag_ids))
  mcfg, (graphdef, variables) = model.config, nnx.split(model)
  del model
  pretrained = state_lib.pure(variables) if spec.pretrained else None
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_lib.pure(variables))
  if programs is None:
    programs = build_programs(cfg, graphdef, variables, mesh, ids, mcfg.sharding_rules)
  else:
    programs.check(cfg, graphdef, mesh, ids)
  return Setup(cfg, mesh, task, ids, mcfg, graphdef, abstract_params, programs), pretrained


def initial_params(s: Setup, pretrained: Any = None) -> Any:
  """Params of a fresh run: `init_checkpoint`, else the loaded HF / GGUF params, else a random initialisation."""
  if s.cfg.init_checkpoint:
    return ckpt_lib.load_params(s.cfg.init_checkpoint, jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), s.abstract_params,
        s.programs.state_shardings.params))
  if pretrained is not None:
    return pretrained
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
                       observe: Callable[[int, Any], None] | None = None,
                       programs: Programs | None = None) -> dict[str, Any]:
  """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the final validation / test metrics.

  `observe(step, params)`, if given, is called with the starting params and after every step (the demo's per-prompt
  probe); it must not keep `params` (the next step donates them). `programs` (from `setup(cfg).programs` of a run
  whose config differs only in `programs.PROGRAM_NEUTRAL` keys, e.g. the seed or q) saves compiling them again;
  without it the run builds its own.

  Writes `workdir/config.json`, `metrics.jsonl` (one row per step, plus eval rows), TensorBoard events,
  `checkpoints/`, `best/` and `results.json` (process 0 writes files; every process writes its checkpoint shards).
  `workdir` is a local folder or an object-store URI such as `gs://bucket/run` (see `checkpoint.resolve_workdir`).
  Raises `workdir.WorkdirError` when another run holds the workdir or it cannot be written, and `preemption.Preempted`
  after a preemption notice (SIGTERM, or JAX's sync point on a multi-host job), once the current step is saved.
  """
  workdir = ckpt_lib.resolve_workdir(workdir)
  # One run per workdir, a write probe first; a preemption notice ends the run at a step boundary (`Preempted`).
  with workdir_lib.hold(workdir), preemption.Watcher() as watcher:
    return _train(cfg, workdir, task, programs, watcher, observe)


def _compile_update_ahead(mesh, programs: Programs, state, batch, rollout_key, step_key, q_range,
                          cfg: TrainConfig):
  """Starts compiling the train step for the first batch's shapes in a background thread (`compile_ahead`)."""
  with jax.set_mesh(mesh):  # as the rollout runs (programs.py), so its trace is the one the call then reuses
    rollout = jax.eval_shape(programs.train_rollout.jitted, state.params, batch["prompt_tokens_BxP"],
                             batch["prompt_mask_BxP"], rollout_key)
  rewards_BxG = jax.ShapeDtypeStruct((cfg.batch_size, cfg.num_samples), jnp.float32)
  programs.train_step.compile_ahead(state, _train_batch(rollout, batch, rewards_BxG), step_key, q_range)


def _train_batch(rollout, batch: dict, rewards_BxG) -> dict:
  """The train step's batch: the rollout, the prompt batch's gold answers and the rewards (arrays or shapes)."""
  return {"rollout": rollout, "answer_tokens_BxA": batch["answer_tokens_BxA"],
          "answer_mask_BxA": batch["answer_mask_BxA"], "rewards_BxG": rewards_BxG}


def _train(cfg: TrainConfig, workdir, task: Task | None, programs: Programs | None, watcher: preemption.Watcher,
           observe: Callable[[int, Any], None] | None) -> dict[str, Any]:
  s, pretrained = setup(cfg, task, programs)
  mesh, task, programs = s.mesh, s.task, s.programs
  reward_funcs = scoring.RewardFuncs.from_config(cfg)  # imports user reward modules now: a missing one fails early
  state_sh = programs.state_shardings
  with_ref = state_sh.ref_params is not None

  # -- state: resume > init_checkpoint > fresh --------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.max_to_keep)
  abstract_state = state_lib.abstract_state(s.abstract_params, programs.tx, state_sh, with_ref)
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
    # donate: the initial params become the state's params in place (only ref_params is a copy), so the weights
    # are never held three times (state.init_state)
    state = state_lib.init_state(initial_params(s, pretrained), programs.tx, cfg.seed, state_sh, with_ref,
                                 donate=True)
  del pretrained  # loaded HF / GGUF weights live on in the state only (donated to it)

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
    if step == start_step:  # the update's compile runs beside the first rollout's (compile_ahead.py)
      _compile_update_ahead(mesh, programs, state, batch, rollout_key, step_key, q_range, cfg)
    rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
    rewards_BxG, per_func_BxGxF = scoring.rollout_reward_table(
        reward_funcs, rollout, [task.train[i] for i in batch_np["index_B"]], task.tokenizer, mesh, cfg.batch_size)
    state, metrics_dev = programs.train_step(state, _train_batch(rollout, batch, rewards_BxG), step_key, q_range)
    metrics_dev = {**metrics_dev, **scoring.reward_func_metrics(per_func_BxGxF, reward_funcs.names)}
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
