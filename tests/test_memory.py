"""XLA's memory analysis of the trainer's programs (`tsallis_jax.train.memory`) against the analytic estimate of
`launch/slices.py`, on abstract shapes (nothing allocated; compiled for one CPU device).

What both model and how closely they agree (CPU XLA; GPU and TPU XLA assign buffers differently):
* train-step arguments = the train state (float32 params and two Adam moments; the analytic state less its gradient
  term) plus the batch: within 5%;
* rollout temporaries >= the analytic KV cache and at most 3 times it (the decode loop's carried cache, one layer's
  cache cast to the compute dtype, logits): the KV cache is the rollout's dominant buffer;
* train-step temporaries within a factor 4 of the analytic activations plus the gradient (a shape count, not a
  buffer assignment: XLA keeps fusion temporaries and the optimizer update's intermediates too).
"""
import pytest

from launch import slices
from tsallis_jax.train import memory
from tsallis_jax.train.config import TrainConfig


def _cfg(model: str, **changes) -> TrainConfig:
  base = dict(name="memory", model=model, max_prompt_len=32, rationale_budget=87, max_answer_len=8, num_samples=4,
              batch_size=4, eval_num_samples=4, eval_batch_size=4, log_ref_kl=False)
  return TrainConfig(**{**base, **changes})


def _check_agreement(cfg: TrainConfig):
  xla = memory.analyse(cfg)
  dims = slices.MODEL_DIMS[cfg.model]
  est = slices.estimate_for_config(cfg, slices.parse_accelerator("v4-8"), {"data": 1, "fsdp": 1})
  # estimate_for_config is per device of the slice; the analysis is for one device running everything.
  devices = slices.parse_accelerator("v4-8").devices
  gib = 2.0**30
  kv = est.rollout_kv * devices * gib
  params = dims.params * 4
  state_without_grads = est.state * gib - params
  batch = xla["train_step"].argument - 3 * params - 4 - 8  # step, key
  assert 0 < batch < 0.05 * 3 * params or batch < 2**20
  assert xla["train_step"].argument == pytest.approx(state_without_grads, rel=0.05, abs=2**20)
  assert xla["train_step"].alias == pytest.approx(3 * params, rel=0.01)  # the donated state, updated in place
  assert kv <= xla["rollout"].temp <= 3 * kv
  activations = est.train_activations * devices * gib + params
  assert activations / 4 <= xla["train_step"].temp <= 4 * activations
  return xla, kv


def test_tiny_xla_memory_agrees_with_the_estimate_and_shrinks_with_chunks_and_bfloat16():
  xla, kv = _check_agreement(_cfg("tiny"))
  chunked, chunked_kv = _check_agreement(_cfg("tiny", rollout_chunk_rows=4))
  assert chunked_kv == kv / 4
  assert chunked["rollout"].temp < xla["rollout"].temp / 2
  _check_agreement(_cfg("tiny", rollout_chunk_rows=4, model_overrides="remat=true,attention_query_chunk=32"))
  b16 = memory.analyse(_cfg("tiny", kv_cache_dtype="bfloat16"))
  assert b16["rollout"].temp < xla["rollout"].temp


@pytest.mark.slow
def test_smollm2_xla_memory_agrees_with_the_estimate():
  _check_agreement(_cfg("smollm2_135m"))


def _grad_temp_bytes(num_layers: int, remat: str, scan_layers: bool) -> int:
  """XLA's temporaries of a jitted gradient of the tiny model's hidden states, 4 rows x 256 tokens."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tsallis_jax.model import ModelConfig, abstract_model
  cfg = ModelConfig.tiny(num_layers=num_layers, remat=remat, scan_layers=scan_layers)
  graphdef, state = nnx.split(abstract_model(cfg))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  n, t = 4, 256

  def loss(p, tokens_NxT):
    positions_NxT = jnp.broadcast_to(jnp.arange(t), (n, t))
    mask_NxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t))
    hidden_NxTxD, _ = nnx.merge(graphdef, p).hidden(tokens_NxT, positions_NxT, mask_NxTxT)
    return jnp.sum(jnp.square(hidden_NxTxD.astype(jnp.float32)))

  compiled = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((n, t), jnp.int32)).compile()
  return memory.xla_memory(compiled).temp


def test_remat_bounds_the_backward_only_under_scan():
  """Why the paper configs set `scan_layers=true`: with the layers under scan and remat "full", XLA's temporaries of
  the backward grow by about one block input per layer; without remat they grow by a layer's activations (here the
  attention probabilities dominate). Measured (CPU XLA, 2 -> 6 layers): scan+full grows < 10% of what scan+none grows.
  (Unrolled + remat grew like no remat at all in the same analysis, on Qwen3-0.6B shapes too; not asserted here,
  since it is the compiler's scheduling, not our contract.)"""
  grow = {remat: _grad_temp_bytes(6, remat, True) - _grad_temp_bytes(2, remat, True) for remat in ("none", "full")}
  assert grow["none"] > 0
  assert grow["full"] < 0.1 * grow["none"], grow


@pytest.mark.slow
def test_paper_finqa_1gpu_analysis_matches_its_record():
  """The full 28-layer analysis of `paper_finqa_1gpu` (Qwen3-0.6B shapes; scan makes the compile independent of
  depth) reproduces the MEMORY recorded in the config, within 5%."""
  import importlib

  from tsallis_jax.model.build import preset_config
  from tsallis_jax.train.config import load_config, model_spec
  cfg = load_config("paper_finqa_1gpu")
  record = importlib.import_module("experiments.configs.paper_finqa_1gpu").MEMORY
  got = memory.summary(cfg, preset_config(model_spec(cfg.replace(model="qwen3_0_6b", model_path=""))))
  for program in ("rollout", "train_step"):
    assert got[program]["peak"] == pytest.approx(record[program]["peak"], rel=0.05), program
