"""XLA's own memory numbers for a run's two big programs, the rollout and the train step, from shapes alone.

`analyse(cfg)` builds the run's jitted programs exactly as the trainer does (`programs.build_programs`), lowers them on
abstract shapes (`jax.ShapeDtypeStruct`; the model from `abstract_model`, so nothing is allocated) and compiles them
for one device; `compiled.memory_analysis()` then gives the buffer sizes XLA assigned. Peak device memory of a
program is about arguments + outputs + temporaries - aliased (donated state written in place); generated code is
reported apart. The numbers are those of the backend that compiles: CPU XLA assigns buffers differently from GPU and
TPU XLA (other fusion, scheduling and rematerialisation), so a CPU analysis is an estimate of a GPU peak, not a
measurement of it. `launch/slices.estimate_memory` is the analytic counterpart (tests/test_memory.py compares them).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tsallis_jax import distributed
from tsallis_jax.model import ModelConfig, abstract_model
from tsallis_jax.train import state as state_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.step import TokenIds

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class XlaMemory:
  """Bytes of one compiled program (`memory_analysis()`)."""
  argument: int
  output: int
  temp: int
  alias: int
  generated_code: int

  @property
  def peak(self) -> int:
    """Arguments + outputs + temporaries - aliased: the live bytes at the program's high-water mark (at most)."""
    return self.argument + self.output + self.temp - self.alias

  def gib(self) -> dict[str, float]:
    return {k: round(v / GIB, 6) for k, v in {**dataclasses.asdict(self), "peak": self.peak}.items()}


def xla_memory(compiled) -> XlaMemory:
  """The `memory_analysis()` of a `jax.stages.Compiled` as an `XlaMemory`."""
  m = compiled.memory_analysis()
  return XlaMemory(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                   temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes),
                   generated_code=int(m.generated_code_size_in_bytes))


def analyse(cfg: TrainConfig, model_cfg: ModelConfig | None = None, ids: TokenIds | None = None,
            mesh: jax.sharding.Mesh | None = None) -> dict[str, XlaMemory]:
  """{"rollout": ..., "train_step": ...}: XLA's memory of one training rollout and one train step of `cfg`.

  Args:
    cfg: the run's config (batch, budgets, memory knobs).
    model_cfg: the model's shapes; default the preset `cfg.model` with `model_overrides` (for "hf" / "gguf" configs
      pass e.g. `ModelConfig.qwen3_0_6b(dtype=..., remat=...)`).
    ids: stop / pad / `</think>` ids (any in-vocabulary ids give the same memory).
    mesh: default a one-device mesh (the numbers are per device).
  """
  from tsallis_jax.model.build import preset_config
  from tsallis_jax.train.config import model_spec
  from tsallis_jax.train.programs import build_programs
  mcfg = model_cfg or preset_config(model_spec(cfg))
  ids = ids or TokenIds(stop_ids=(1,), pad_id=0, close_tag_ids=(2,))
  mesh = mesh or distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  graphdef, abstract_vars = nnx.split(abstract_model(mcfg, seed=cfg.seed))
  programs = build_programs(cfg, graphdef, abstract_vars, mesh, ids, mcfg.sharding_rules)
  params = state_lib.pure(abstract_vars)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  b, p, a = cfg.batch_size, cfg.max_prompt_len, cfg.max_answer_len
  tokens = jax.ShapeDtypeStruct((b, p), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, p), bool)
  key = jax.eval_shape(lambda: jax.random.key(0))  # a typed key, as the loop passes
  with_ref = programs.state_shardings.ref_params is not None
  with jax.set_mesh(mesh):
    rollout_compiled = programs.train_rollout.jitted.lower(params, tokens, mask, key).compile()
    rollout = jax.eval_shape(programs.train_rollout.jitted, params, tokens, mask, key)
    state = jax.eval_shape(lambda p_: state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=p_, opt_state=programs.tx.init(p_), key=jax.random.key(0),
        ref_params=p_ if with_ref else None), params)
    batch = {"rollout": rollout, "answer_tokens_BxA": jax.ShapeDtypeStruct((b, a), jnp.int32),
             "answer_mask_BxA": jax.ShapeDtypeStruct((b, a), bool),
             "rewards_BxG": jax.ShapeDtypeStruct((b, cfg.num_samples), jnp.float32)}
    q_range = jax.ShapeDtypeStruct((2,), jnp.float32)
    step_compiled = programs.train_step.jitted.lower(state, batch, key, q_range).compile()
  return {"rollout": xla_memory(rollout_compiled), "train_step": xla_memory(step_compiled)}


def params_bytes(model_cfg: ModelConfig) -> int:
  """Bytes of the model's parameters (from shapes)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state_lib.pure(nnx.state(abstract_model(model_cfg)))))


def summary(cfg: TrainConfig, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
  """`analyse` in GiB, with the device peak: the larger program's peak (they do not run at the same time, but the
  train state is an argument of both: params in the rollout, the whole state in the step)."""
  result = {name: m.gib() for name, m in analyse(cfg, model_cfg).items()}
  result["peak_gib"] = max(result["rollout"]["peak"], result["train_step"]["peak"])
  return result


def analyse_by_layers(cfg: TrainConfig, model_cfg: ModelConfig, layers: tuple[int, int] = (1, 2)
                      ) -> dict[str, dict[str, float]]:
  """`analyse` of the model cut to `layers[0]` and `layers[1]` layers, extrapolated linearly to its full depth.

  For models whose full compile is slow on CPU: every field of `XlaMemory` is taken as a + b * L (the layers are
  identical, and the KV cache, the saved activations and the parameters all grow by one layer's worth per layer).
  Returns GiB per program, as `XlaMemory.gib()`, plus the measured points.
  """
  l0, l1 = layers
  at = {n: analyse(cfg, model_cfg.replace(num_layers=n)) for n in layers}
  out: dict[str, Any] = {"layers_measured": list(layers), "num_layers": model_cfg.num_layers}
  for program in ("rollout", "train_step"):
    m0, m1 = dataclasses.asdict(at[l0][program]), dataclasses.asdict(at[l1][program])
    full = {k: int(m0[k] + (m1[k] - m0[k]) * (model_cfg.num_layers - l0) / (l1 - l0)) for k in m0}
    out[program] = XlaMemory(**full).gib()
    out[f"{program}_measured"] = {n: at[n][program].gib() for n in layers}
  out["peak_gib"] = max(out["rollout"]["peak"], out["train_step"]["peak"])
  return out


if __name__ == "__main__":  # python -m tsallis_jax.train.memory paper_finqa_1gpu [qwen3_0_6b] [L0,L1] > out.json
  import json
  import sys

  from tsallis_jax.model.build import preset_config
  from tsallis_jax.train.config import load_config, model_spec
  train_cfg = load_config(sys.argv[1])
  preset = sys.argv[2] if len(sys.argv) > 2 else train_cfg.model
  model = preset_config(model_spec(train_cfg.replace(model=preset, model_path="")))
  if len(sys.argv) > 3:
    result = analyse_by_layers(train_cfg, model, tuple(int(n) for n in sys.argv[3].split(",")))
  else:
    result = summary(train_cfg, model)
  print(json.dumps(result, indent=1))
