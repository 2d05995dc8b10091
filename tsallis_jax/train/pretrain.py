"""Supervised pretraining of the demo's tiny LM, cached, and the measurement of its cold-start p0 (spec 1.5, 1.7).

The paper starts from a model whose success probability P on the target task is tiny (cold start). The CPU demo
builds such a model in this same code base: a tiny LM is trained by teacher forcing (SFT) on
`ChainMix.pretraining_records` (one source and one target task per difficulty bucket): source-task chains with
correct rationales and answers, mixed with target-task chains whose rationales are correct but whose answers are uniform random. The model therefore writes the target's format
and rationale but puts roughly uniform mass on the target's answers: p0 ~ nominal_p0 = modulus^-answer_len, per bucket.

The result is cached under `$TSALLIS_JAX_CACHE/demo_pretrain/<key>/` (default `~/.cache/tsallis_jax`): `params/`
(an orbax params checkpoint, usable as `init_checkpoint`) and `info.json` (the recipe, the final SFT loss, the measured
p0). The key hashes the whole recipe, so a changed recipe retrains. Delete the folder to retrain.

`measure_p0` estimates p0 = E_x[P(y*|x)] = E_x E_{z~p(z|x)}[p(y*|x, z)] on held-out prompts: G rationales sampled per
prompt from the model (temperature 1), the gold answer teacher-forced after each (w = 0 for a rationale that ended
with EOS before `</think>`: it never answers; `success.make_scorer`); the mean of w over samples and prompts is an
unbiased estimate (spec eq. 7-8). It also reports the sampled exact-match success rate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tsallis_jax.data import prompts as prompts_lib
from tsallis_jax.data.records import Record
from tsallis_jax.model import ModelConfig, Transformer, make_attention_mask, make_positions
from tsallis_jax.model.gguf_io import cache_root
from tsallis_jax.model.logprobs import token_logprobs
from tsallis_jax.train import checkpoint as ckpt_lib
from tsallis_jax.train.schedules import clip_by_global_norm
from tsallis_jax.train.state import pure


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The SFT recipe (every field enters the cache key)."""
  num_records: int = 20000
  target_fraction: float = 0.5
  steps: int = 1500
  batch_size: int = 64
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  weight_decay: float = 0.0
  seed: int = 0
  max_len: int = 48


def sft_arrays(records: Sequence[Record], tokenizer: Any, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [prompt, rationale, `</think>`, answer, EOS] ids and the loss mask on the completion tokens."""
  pad = tokenizer.pad_token_id
  tokens = np.full((len(records), max_len), pad, np.int32)
  loss_mask = np.zeros((len(records), max_len), bool)
  for i, record in enumerate(records):
    ids, mask = prompts_lib.sft_example(record, tokenizer, style="cold")
    if len(ids) > max_len:
      raise ValueError(f"{record.where()}: {len(ids)} SFT tokens exceed max_len={max_len}; raise max_len")
    tokens[i, :len(ids)] = ids
    loss_mask[i, :len(ids)] = mask
  return tokens, loss_mask


def sft_train(model_cfg: ModelConfig, tokens_NxT: np.ndarray, loss_mask_NxT: np.ndarray, cfg: PretrainConfig,
              log_every: int = 250) -> tuple[nnx.GraphDef, Any, list[float]]:
  """Teacher-forced next-token training on the masked completion tokens; returns (graphdef, params, losses)."""
  graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed)))
  params = pure(params)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps)
  tx = optax.chain(clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = tx.init(params)

  def loss_fn(p, tokens_BxT, mask_BxT):
    model = nnx.merge(graphdef, p)
    pad_BxT = jnp.ones(tokens_BxT.shape, bool)  # right padding under a causal mask: real tokens never see pads
    logits, _ = model(tokens_BxT, make_positions(pad_BxT), make_attention_mask(pad_BxT))
    logp_BxT = token_logprobs(logits, tokens_BxT)
    mask = mask_BxT.astype(jnp.float32)
    return -jnp.sum(logp_BxT * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  @jax.jit
  def step(p, o, tokens_BxT, mask_BxT):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens_BxT, mask_BxT)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(cfg.seed)
  losses = []
  for i in range(cfg.steps):
    idx = rng.integers(0, tokens_NxT.shape[0], size=cfg.batch_size)
    params, opt_state, loss = step(params, opt_state, tokens_NxT[idx], loss_mask_NxT[idx])
    if (i + 1) % log_every == 0 or i + 1 == cfg.steps:
      losses.append(float(loss))
  return graphdef, params, losses


def measure_p0(graphdef: nnx.GraphDef, params: Any, records: Sequence[Record], tokenizer: Any, *,
               num_samples: int, max_prompt_len: int, rationale_budget: int, max_answer_len: int, seed: int = 0,
               batch_size: int = 16) -> dict[str, Any]:
  """Monte Carlo p0 = mean over prompts and sampled rationales of w = p(y*|x, z), and the sampled success rate.

  Also returns the per-prompt estimates (`p_hat_by_prompt`, in the order of `records`; `success.success_by_prompt`).
  """
  from tsallis_jax.train import success
  close = (int(tokenizer.convert_tokens_to_ids("</think>")),)
  eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
  score = success.make_scorer(graphdef, num_samples=num_samples, rationale_budget=rationale_budget,
                              max_answer_len=max_answer_len, stop_ids=(eos,), pad_id=pad, close_tag_ids=close)
  out = success.success_by_prompt(score, params, records, tokenizer, key=jax.random.key(seed),
                                  max_prompt_len=max_prompt_len, max_answer_len=max_answer_len,
                                  batch_size=batch_size)
  return {"p0_likelihood": float(out["p_hat"].mean()), "p0_sampled_exact_match": float(out["sampled"].mean()),
          "p0_prompts": len(records), "p0_samples_per_prompt": num_samples,
          "p_hat_by_prompt": out["p_hat"].tolist()}


# ModelConfig fields that change speed or memory but not the trained function; None-valued (off) options are dropped
# too, so that a new optional model feature does not invalidate the cache.
_PERFORMANCE_ONLY = ("sharding_rules", "remat", "attention_query_chunk", "attention_impl")


def cache_key(model_cfg: ModelConfig, target: Any, cfg: PretrainConfig) -> str:
  model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if v is not None and k not in _PERFORMANCE_ONLY}
  if not model_cfg.scan_layers:  # the params' tree layout is part of the key; unrolled keys are those from before it
    del model["scan_layers"]
  blob = json.dumps({"model": model, "target": dataclasses.asdict(target), "pretrain": dataclasses.asdict(cfg),
                     "version": 4}, sort_keys=True, default=str)  # 3: weights [out, in]; 4: ChainMix
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_demo_model(model_cfg: ModelConfig, target: Any, cfg: PretrainConfig, *, cache: str | None = None,
                          log=print) -> tuple[str, dict[str, Any]]:
  """The params folder of the pretrained tiny LM for `target` (a `synthetic.ChainMix`; trained on first use, then
  cached) and its info."""
  from tsallis_jax.data import synthetic
  folder = os.path.join(cache or str(cache_root() / "demo_pretrain"), cache_key(model_cfg, target, cfg))
  info_path = os.path.join(folder, "info.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
    log(f"pretrained model: cached at {folder}")
    return os.path.join(folder, "params"), info
  tokenizer = synthetic.make_tokenizer()
  records = target.pretraining_records(cfg.num_records, seed=cfg.seed + 10, target_fraction=cfg.target_fraction)
  tokens, mask = sft_arrays(records, tokenizer, cfg.max_len)
  start = time.perf_counter()
  graphdef, params, losses = sft_train(model_cfg, tokens, mask, cfg)
  seconds = time.perf_counter() - start
  os.makedirs(folder, exist_ok=True)
  ckpt_lib.save_params(os.path.join(folder, "params"), params)
  info = {"recipe": dataclasses.asdict(cfg), "model": repr(model_cfg), "target": repr(target),
          "sft_losses": losses, "sft_seconds": seconds}
  with open(info_path + ".tmp", "w") as f:
    json.dump(info, f, indent=1)
  os.replace(info_path + ".tmp", info_path)  # info.json last: its presence marks a complete cache entry
  log(f"pretrained model: {cfg.steps} SFT steps in {seconds:.0f} s, final loss {losses[-1]:.3f}; cached at {folder}")
  return os.path.join(folder, "params"), info
