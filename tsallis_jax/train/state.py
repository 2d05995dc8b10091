"""The train state and its sharded construction (STYLE.md point 5: shapes first, then shardings, then build).

`TrainState` is a pytree of arrays only, so orbax saves it whole and the train step donates it whole:

  step        int32 scalar, updates applied so far
  params      nnx.State of the policy's parameters
  opt_state   optax state (mirrors params)
  key         typed PRNG key (`jax.random.key(seed)`); per-step keys are fold_in(key, step), so the key never
              changes. Checkpoints hold its `key_data` (the one conversion, in checkpoint.py)
  ref_params  nnx.State of the initial policy (KL to the initial policy), or None when not needed
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsallis_jax.model import param_shardings
from tsallis_jax.model.transformer import pure  # noqa: F401 (state_lib.pure, used across train/)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array
  ref_params: Any = None


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_vars: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, rules,
                    with_ref: bool) -> TrainState:
  """NamedShardings for every leaf of the state: params by the model's logical-axis rules, optimizer moments like
  their params (`optax.tree_map_params`), everything else replicated. `abstract_vars` is the model's nnx.State of
  Variables (their `logical_axes` metadata gives the parameter shardings)."""
  shardings = param_shardings(abstract_vars, mesh, rules)
  shardings = jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, shardings,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  abstract_opt = jax.eval_shape(tx.init, pure(abstract_vars))
  opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, shardings,
                                        transform_non_params=lambda _: replicated(mesh),
                                        is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated(mesh), params=shardings, opt_state=opt_shardings, key=replicated(mesh),
                    ref_params=shardings if with_ref else None)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, shardings: TrainState,
               with_ref: bool, *, donate: bool = False) -> TrainState:
  """Builds the state on its shardings from (possibly unsharded) params: one jitted call with out_shardings.

  `donate=True` hands the params' buffers to the state: the state's params are the given arrays, written in place by
  the first step, and only the frozen `ref_params` is a new copy. Without it both are copies and the caller's arrays
  are freed afterwards, so the weights are held three times at once, and most of the freed copy stays resident (glibc
  keeps freed per-tensor blocks of a few MB in its heap: 0.4 GB of the 0.54 GB of float32 SmolLM2-135M, all of it
  still there at the train step's peak). The caller's arrays are deleted; use it when they are not needed afterwards
  (the trainer's loaded or freshly initialised params). Params that cannot be donated (numpy arrays, or arrays on
  other shardings than the state's) are copied as without it. The state is the same bit for bit either way.
  """

  def build(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      key=jax.random.key(seed), ref_params=p if with_ref else None)

  leaves, targets = jax.tree.leaves(params), jax.tree.leaves(shardings.params)
  donatable = donate and len(leaves) == len(targets) and all(
      isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, x.ndim) for x, sh in zip(leaves, targets))
  return jax.jit(build, out_shardings=shardings, donate_argnums=(0,) if donatable else ())(params)


def abstract_state(abstract_params: Any, tx: optax.GradientTransformation, shardings: TrainState,
                   with_ref: bool) -> TrainState:
  """The state's shapes, dtypes and shardings (ShapeDtypeStructs): the target a checkpoint is restored into."""
  shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                               key=jax.random.key(0), ref_params=p if with_ref else None),
                          abstract_params)
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)
