"""Logical axis names to mesh shardings (the maxtext / tunix convention; STYLE.md points 5 and 6).

Every parameter carries a `logical_axes` metadata tuple (e.g. `("vocab", "embed")`). The rules in
`ModelConfig.sharding_rules` map each logical name to mesh axes. Two relaxations keep one rule set valid on every mesh:
mesh axes the mesh lacks are dropped, and so is a mesh axis whose size does not divide the dimension (e.g. a width of
66 on an fsdp axis of 4 is replicated). Without a mesh every helper is a no-op. Meshes come from
`tsallis_jax.distributed.make_mesh`.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsallis_jax.model.config import ShardingRules

LogicalAxes = tuple[str | None, ...]


def logical_to_spec(logical_axes: LogicalAxes, shape: Sequence[int] | None, rules: ShardingRules,
                    mesh_axis_sizes: dict[str, int]) -> PartitionSpec:
  """The PartitionSpec for one array: each logical axis through `rules`, keeping only usable mesh axes.

  A mesh axis is usable when the mesh has it, no earlier dimension used it, and (when `shape` is given) the
  product of the kept axes' sizes divides that dimension.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    kept = []
    size = 1
    for axis in targets:
      if axis not in mesh_axis_sizes or axis in used:
        continue
      if shape is not None and shape[i] % (size * mesh_axis_sizes[axis]):
        continue
      kept.append(axis)
      size *= mesh_axis_sizes[axis]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def _mesh_axis_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)) if hasattr(mesh, "axis_sizes") else dict(mesh.shape)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: ShardingRules) -> nnx.State:
  """NamedShardings for a state of (abstract) `nnx.Variable`s, from each variable's `logical_axes` metadata."""
  sizes = _mesh_axis_sizes(mesh)

  def one(var):
    axes = var.get_metadata().get("logical_axes")
    value = var.get_value()
    if axes is None:
      axes = (None,) * len(value.shape)
    if len(axes) != len(value.shape):
      raise ValueError(f"logical_axes {axes} do not match the parameter's shape {value.shape}.")
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, rules, sizes))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: LogicalAxes, rules: ShardingRules) -> jax.Array:
  """`with_sharding_constraint` on a key activation when a mesh is set (`jax.set_mesh`); identity otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(logical_axes, x.shape, rules, _mesh_axis_sizes(mesh))
  return jax.lax.with_sharding_constraint(x, spec)
