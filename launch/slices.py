"""Cloud TPU accelerator types, and the slice and mesh we suggest per model size (launch/TPU.md).

Pure Python, no JAX: the launch wrapper validates a slice and a mesh on a laptop before it creates anything.

Device counts: JAX sees one device per chip on v4, v5p (megacore: the name counts TensorCores, two per chip),
v5e and v6e (the name counts chips), and one device per TensorCore on v2 and v3. Hosts carry 4 chips (v4, v5p,
multi-host v5e / v6e) or 8 TensorCores (v2, v3); v5e and v6e slices of up to 8 chips are a single host.
"""
from __future__ import annotations

import dataclasses
import re

from tsallis_jax.distributed import resolve_axis_sizes


@dataclasses.dataclass(frozen=True)
class Family:
  """One TPU generation: how its accelerator-type names map to devices and hosts."""
  prefix: str  # the accelerator type is f"{prefix}-{n}"
  sizes: tuple[int, ...]  # the valid n
  n_per_device: int  # n / devices (2 where the name counts TensorCores and JAX sees a megacore chip)
  devices_per_host: int
  single_host_max: int  # slices with n <= this are one host
  runtime_version: str  # `gcloud compute tpus tpu-vm create --version` (Cloud TPU "TPU software versions" page)
  hbm_gib_per_device: int


_POW2_FROM_8 = tuple(2**k for k in range(3, 13))  # 8 ... 4096
FAMILIES: dict[str, Family] = {f.prefix: f for f in (
    Family("v2", (8, 32, 128, 256, 512), 1, 8, 8, "tpu-ubuntu2204-base", 8),
    Family("v3", (8, 32, 64, 128, 256, 512, 1024, 2048), 1, 8, 8, "tpu-ubuntu2204-base", 16),
    Family("v4", _POW2_FROM_8, 2, 4, 8, "tpu-ubuntu2204-base", 32),
    Family("v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), 1, 4, 8, "v2-alpha-tpuv5-lite", 16),
    Family("v5p", _POW2_FROM_8 + (8192,), 2, 4, 8, "v2-alpha-tpuv5", 95),
    Family("v6e", (1, 4, 8, 16, 32, 64, 128, 256), 1, 4, 8, "v2-alpha-tpuv6e", 32),
)}
_ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A parsed accelerator type such as v4-32."""
  name: str  # as gcloud spells it, e.g. "v5litepod-16"
  family: Family
  devices: int  # jax.device_count() on the whole slice
  hosts: int  # TPU VM workers = JAX processes

  @property
  def runtime_version(self) -> str:
    return self.family.runtime_version

  @property
  def multi_host(self) -> bool:
    return self.hosts > 1


def known_accelerators() -> list[str]:
  return [f"{f.prefix}-{n}" for f in FAMILIES.values() for n in f.sizes]


def parse_accelerator(name: str) -> Accelerator:
  """Parses a Cloud TPU accelerator type ("v4-8", "v5litepod-16", "v5e-16", "v6e-8", ...).

  Raises:
    ValueError: an unknown family or a size that family does not come in, naming the valid ones.
  """
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  prefix = _ALIASES.get(match.group(1), match.group(1)) if match else None
  if not match or prefix not in FAMILIES:
    families = ", ".join(f"{f.prefix}-N" for f in FAMILIES.values())
    raise ValueError(f"unknown accelerator type {name!r}; use one of {families} (e.g. v4-8, v5litepod-8, v6e-8). "
                     "For a multi-GPU host, run launch/host.sh on that host instead (launch/TPU.md).")
  family, n = FAMILIES[prefix], int(match.group(2))
  if n not in family.sizes:
    raise ValueError(f"accelerator type {name!r}: {prefix} slices come in sizes {list(family.sizes)}; "
                     f"e.g. {prefix}-{family.sizes[0]}.")
  devices = n // family.n_per_device
  hosts = 1 if n <= family.single_host_max else devices // family.devices_per_host
  return Accelerator(name=f"{prefix}-{n}", family=family, devices=devices, hosts=hosts)


def parse_mesh(text: str) -> dict[str, int]:
  """Parses "data=-1,fsdp=4" into {"data": -1, "fsdp": 4} (the trainer's mesh axes are data and fsdp)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    if not sep or key.strip() not in ("data", "fsdp"):
      raise ValueError(f"mesh entry {part!r}: write the mesh as 'data=D,fsdp=F' (D may be -1 = the rest).")
    try:
      sizes[key.strip()] = int(value)
    except ValueError:
      raise ValueError(f"mesh entry {part!r}: the size {value!r} is not an integer.") from None
  if not sizes:
    raise ValueError(f"mesh {text!r} is empty; write e.g. 'data=-1,fsdp=1'.")
  return {"data": sizes.get("data", -1), "fsdp": sizes.get("fsdp", 1)}


def check_mesh(mesh: dict[str, int], accelerator: Accelerator, batch_size: int | None = None) -> dict[str, int]:
  """Resolves the mesh on the slice's device count; checks that the global batch splits over it.

  Raises:
    ValueError: a mesh that does not divide the slice's devices, or a batch that does not split over them.
  """
  try:
    sizes = resolve_axis_sizes(mesh, accelerator.devices)
  except ValueError as e:
    raise ValueError(f"{accelerator.name} has {accelerator.devices} devices: {e}") from None
  if batch_size is not None and batch_size % accelerator.devices:
    raise ValueError(f"batch_size={batch_size} does not split over the {accelerator.devices} devices of "
                     f"{accelerator.name}; use a multiple of {accelerator.devices} (--set batch_size=...).")
  return sizes


@dataclasses.dataclass(frozen=True)
class Suggestion:
  """A slice and mesh for one model size. Memory is an estimate, not a TPU measurement (launch/TPU.md)."""
  model: str
  params_b: float  # parameters, billions
  accelerator: str
  mesh: str
  alternative: str  # another slice that fits, with its mesh
  note: str


def train_state_gib(params_b: float, bytes_per_param: int = 20) -> float:
  """Rough train-state size: float32 params, grads, two Adam moments, plus a float32 reference copy for KL."""
  return params_b * 1e9 * bytes_per_param / 2**30


SUGGESTIONS: dict[str, Suggestion] = {s.model: s for s in (
    Suggestion("qwen3_0_6b", 0.6, "v4-8", "data=-1,fsdp=1", "v5litepod-8 with data=2,fsdp=4",
               "The paper's model. ~11 GiB of train state fits one 32 GiB v4 chip, so pure data parallelism; on "
               "16 GiB v5e chips shard it (fsdp=4). batch_size must be a multiple of the device count (4 / 8)."),
    Suggestion("qwen3_1_7b", 1.7, "v4-8", "data=1,fsdp=4", "v5litepod-8 with data=1,fsdp=8",
               "~32 GiB of train state: shard parameters and optimizer over the host's chips."),
    Suggestion("qwen3_4b", 4.0, "v4-16", "data=1,fsdp=8", "v5p-8 with data=1,fsdp=4",
               "~75 GiB of train state: two v4 hosts (multi-host), or one v5p host with 95 GiB chips; "
               "consider --set dtype=bfloat16 for activations."),
    Suggestion("qwen3_8b", 8.0, "v4-32", "data=1,fsdp=16", "v5p-16 with data=1,fsdp=8",
               "~150 GiB of train state: four v4 hosts. Beyond ~30B parameters the trainer would need a tensor-"
               "parallel axis, which it does not have (only data and fsdp)."),
)}


def model_key(model: str, model_path: str = "") -> str:
  """The suggestion key of a config's model: the preset name, or for "hf"/"gguf" the weights' folder or file name
  normalised ("/models/Qwen3-0.6B" -> "qwen3_0_6b")."""
  if model in ("hf", "gguf") and model_path:
    name = model_path.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[-.]", "_", name).lower()
  return model


def suggest(model: str) -> Suggestion:
  """The suggested slice and mesh for a model preset name (the trainer's `model` key)."""
  if model not in SUGGESTIONS:
    raise ValueError(f"no slice suggestion for model {model!r}; known: {sorted(SUGGESTIONS)}. Pass --accelerator "
                     "and --mesh yourself (launch/TPU.md explains the arithmetic).")
  return SUGGESTIONS[model]
