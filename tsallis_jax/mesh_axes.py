"""Mesh axis sizes without JAX: `resolve_axis_sizes` fills in the one axis of size -1.

Standard library only, so the launch wrapper (`python -m launch.tpu`, run from a laptop that need not have JAX)
checks a mesh against a slice's chip count; `tsallis_jax.distributed` re-exports it for the trainer.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


def resolve_axis_sizes(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in the one axis of size -1 so that the sizes multiply to `num_devices`.

  Pure (no devices needed), so the launch wrapper checks a mesh against a slice's chip count before it creates
  anything.

  Args:
    axis_sizes: mesh axis name -> size, in mesh order, e.g. {"data": -1, "model": 2}. At most one size is -1.
    num_devices: the global device count the mesh must cover exactly.

  Returns:
    A new dict with every size positive and their product equal to `num_devices`.

  Raises:
    ValueError: empty mapping, a bad size, more than one -1, or a product that does not match the device count.
  """
  if not axis_sizes:
    raise ValueError("axis_sizes is empty; give at least one axis, e.g. {'data': -1}.")
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be >= 1.")
  for name, size in axis_sizes.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"mesh axis names must be non-empty strings; got {name!r}.")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name!r} has size {size!r}; use a positive integer, or -1 for 'the rest'.")
  wildcards = [name for name, size in axis_sizes.items() if size == -1]
  if len(wildcards) > 1:
    raise ValueError(f"mesh axes {wildcards} are all -1; at most one axis may take 'the rest' of the devices.")
  fixed = math.prod(int(size) for size in axis_sizes.values() if size != -1)
  shown = dict(axis_sizes)
  if wildcards:
    if num_devices % fixed:
      raise ValueError(
          f"mesh {shown}: the fixed axes multiply to {fixed}, which does not divide the {num_devices} devices; "
          f"choose sizes whose product divides {num_devices}.")
    return {name: (num_devices // fixed if size == -1 else int(size)) for name, size in axis_sizes.items()}
  if fixed != num_devices:
    hint = ("set one axis to -1 to use the rest" if num_devices % fixed == 0
            else f"choose sizes whose product divides {num_devices}")
    raise ValueError(f"mesh {shown} covers {fixed} devices but there are {num_devices} devices; {hint}.")
  return {name: int(size) for name, size in axis_sizes.items()}
