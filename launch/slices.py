"""Cloud TPU accelerator types, a per-device memory estimate, and the slice and mesh we suggest (launch/TPU.md).

Pure Python, no JAX (except `paper_table`, which loads the trainer's configs): the launch wrapper validates a
slice and a mesh on a laptop before it creates anything.

Device counts: JAX sees one device per chip on v4, v5p (megacore: the name counts TensorCores, two per chip),
v5e and v6e (the name counts chips), and one device per TensorCore on v2 and v3. Hosts carry 4 chips (v4, v5p,
multi-host v5e / v6e) or 8 TensorCores (v2, v3); v5e and v6e slices of up to 8 chips are a single host.

`estimate_memory` sizes one training step from shapes alone (train state, the sampler's KV cache, the teacher-
forced step's activations, following the trainer's micro-batching, chunked log-probs, remat and query-chunked
attention); `suggest_for_config` picks the smallest slice that holds a config's step. Neither was checked on a TPU:
the KV-cache and parameter terms are tested against the library's own model and cache; the activation term is a
shape count, not a measurement of what XLA allocates.
"""
from __future__ import annotations

import dataclasses
import re

from tsallis_jax.mesh_axes import resolve_axis_sizes  # standard library only: the wrapper runs without JAX


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
THINK_CLOSE_LEN = 1  # tokens of `</think>`: one in Qwen3's vocabulary and in every tokenizer the trainer loads


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
class ModelDims:
  """The shapes that set memory (the legend's L, D, F, H, K, E, V), as in tsallis_jax.model.config presets."""
  layers: int
  embed: int
  mlp: int
  heads: int
  kv_heads: int
  head_dim: int
  vocab: int
  tied: bool = True
  qk_norm: bool = True  # Qwen3's q/k RMSNorm weights (Llama / SmolLM2 have none)

  @property
  def params(self) -> int:
    """Parameter count (norm weights included)."""
    d, e = self.embed, self.head_dim
    attn = d * self.heads * e * 2 + d * self.kv_heads * e * 2 + (2 * e if self.qk_norm else 0)  # q, o; k, v
    block = attn + 3 * d * self.mlp + 2 * d
    return self.vocab * d * (1 if self.tied else 2) + self.layers * block + d


# Qwen3 sizes (the Qwen3 model cards' config.json); qwen3_0_6b equals tsallis_jax.model.config.ModelConfig.qwen3_0_6b.
MODEL_DIMS: dict[str, ModelDims] = {
    "qwen3_0_6b": ModelDims(28, 1024, 3072, 16, 8, 128, 151_936),
    "qwen3_1_7b": ModelDims(28, 2048, 6144, 16, 8, 128, 151_936),
    "qwen3_4b": ModelDims(36, 2560, 9728, 32, 8, 128, 151_936),
    "qwen3_8b": ModelDims(36, 4096, 12288, 32, 8, 128, 151_936, tied=False),
    # The library's other presets (ModelConfig.tiny, ModelConfig.smollm2_135m), for tests and CPU checks.
    "tiny": ModelDims(2, 64, 128, 4, 2, 16, 128),
    "smollm2_135m": ModelDims(30, 576, 1536, 9, 3, 64, 49_152, qk_norm=False),
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """GiB per device for one training step, from shapes alone (not measured on a TPU; XLA temporaries not counted).

  state: float32 params, grads, two Adam moments (and the reference params when kl/ref is logged; and the gradient
    accumulator when micro-batching), over fsdp.
  rollout_kv: the sampler's KV cache, B*G rows (or `rollout_chunk_rows`) of the full sequence length in the KV-cache
    dtype (default the compute dtype), rows over all devices (the sampler repeats each prompt's cache G times).
  train_activations: the teacher-forced forward kept for the backward, for the rows that live at once (one
    micro-batch's m*G when micro-batching, else B*G), over all devices: per layer about 8 D + 3 F values per token
    (all layers, or with remat each layer's input plus one layer's working set), the float32 attention scores
    (H x T x T per row and layer, or one block of H x chunk x T with query-chunked attention), and the float32
    logits (T x V per row, or chunk x V with `logprob_chunk`). It counts every row's full sequence, as with
    `share_prompt_forward=False`; the default runs each prompt once for its G rows and needs less (XLA's analysis
    of `paper_finqa_1gpu`'s train step: 60.4 GiB with it, 73.2 GiB without), so the estimate is an upper bound there.
  """
  state: float
  rollout_kv: float
  train_activations: float

  @property
  def peak(self) -> float:
    return self.state + max(self.rollout_kv, self.train_activations)


def estimate_memory(dims: ModelDims, *, batch_size: int, num_samples: int, seq_len: int, devices: int, fsdp: int,
                    compute_bytes: int = 4, ref_params: bool = True, remat: bool = False,
                    micro_batch_prompts: int = 0, logprob_chunk: int = 0,
                    attention_query_chunk: int | None = None, kv_bytes: int | None = None,
                    rollout_chunk_rows: int = 0) -> MemoryEstimate:
  """Per-device memory of one step; see `MemoryEstimate` for what each term holds.

  The knobs follow the trainer: `micro_batch_prompts` and `logprob_chunk` (`TrainConfig`), `remat` and
  `attention_query_chunk` (`ModelConfig`, via `model_overrides`), `rollout_chunk_rows` and `kv_bytes` (the
  `kv_cache_dtype`'s bytes; None = `compute_bytes`) (`TrainConfig`); 0 / None = off.
  """
  gib = 2.0**30
  rows = batch_size * num_samples
  act_rows = (micro_batch_prompts or batch_size) * num_samples  # rows whose activations live at once
  state = dims.params * (16 + (4 if ref_params else 0) + (4 if micro_batch_prompts else 0)) / fsdp
  kv_rows = min(rollout_chunk_rows, rows) if rollout_chunk_rows else rows  # the rows whose cache lives at once
  kv = kv_rows * seq_len * 2 * dims.layers * dims.kv_heads * dims.head_dim * (kv_bytes or compute_bytes) / devices
  queries = min(attention_query_chunk, seq_len) if attention_query_chunk else seq_len
  scores = act_rows * dims.heads * queries * seq_len * 4  # one layer's (or one query block's) float32 scores
  values = act_rows * seq_len * (8 * dims.embed + 3 * dims.mlp) * compute_bytes  # one layer's other activations
  saved = act_rows * seq_len * dims.embed * compute_bytes * dims.layers  # each block's input, the remat checkpoints
  # Query-chunked attention rematerialises each block's scores, so only one block's are alive; otherwise every
  # layer keeps its scores for the backward (one layer's with remat).
  per_layer_kept = values + (0 if attention_query_chunk else scores)
  block_scores = scores if attention_query_chunk else 0  # the one query block being computed
  if remat:
    layers = saved + per_layer_kept + block_scores
  else:
    layers = per_layer_kept * dims.layers + block_scores
  logits = act_rows * (min(logprob_chunk, seq_len) if logprob_chunk else seq_len) * dims.vocab * 4
  train = (layers + logits) / devices
  return MemoryEstimate(state=state / gib, rollout_kv=kv / gib, train_activations=train / gib)


def _model_overrides(text: str) -> dict[str, str]:
  """"remat=true,attention_query_chunk=512" -> {"remat": "true", ...} (as `TrainConfig.model_overrides`)."""
  pairs = (item.split("=", 1) for item in (s.strip() for s in text.split(",")) if "=" in item)
  return {k.strip(): v.strip().lower() for k, v in pairs}


def estimate_for_config(cfg, accelerator: Accelerator, mesh: dict[str, int]) -> MemoryEstimate | None:
  """`estimate_memory` for a trainer `TrainConfig` on a slice; None when its model's shapes are unknown here."""
  dims = MODEL_DIMS.get(model_key(cfg.model, cfg.model_path))
  if dims is None:
    return None
  overrides = _model_overrides(getattr(cfg, "model_overrides", ""))
  chunk = overrides.get("attention_query_chunk", "none")
  return estimate_memory(dims, batch_size=cfg.batch_size, num_samples=cfg.num_samples,
                         seq_len=cfg.total_len(THINK_CLOSE_LEN), devices=accelerator.devices, fsdp=mesh["fsdp"],
                         compute_bytes=2 if cfg.dtype == "bfloat16" else 4,
                         ref_params=bool(getattr(cfg, "log_ref_kl", True) or getattr(cfg, "kl_coef", 0.0)),
                         # any remat policy ("full", "dots_saveable", ... or the old "true") counts as remat here
                         remat=overrides.get("remat", "none") not in ("none", "false", "0", "no"),
                         micro_batch_prompts=getattr(cfg, "micro_batch_prompts", 0),
                         logprob_chunk=getattr(cfg, "logprob_chunk", 0),
                         attention_query_chunk=int(chunk) if chunk.isdigit() else None,
                         kv_bytes={"": None, "float32": 4, "bfloat16": 2}[getattr(cfg, "kv_cache_dtype", "")],
                         rollout_chunk_rows=getattr(cfg, "rollout_chunk_rows", 0))


@dataclasses.dataclass(frozen=True)
class Suggestion:
  """A slice and mesh that hold one model's train state (memory: `estimate_memory`; launch/TPU.md)."""
  model: str
  accelerator: str
  mesh: str
  alternative: str  # another slice that fits, with its mesh
  note: str

  @property
  def params_b(self) -> float:
    return MODEL_DIMS[self.model].params / 1e9


def train_state_gib(params_b: float, bytes_per_param: int = 20) -> float:
  """Train-state size: float32 params, grads, two Adam moments, plus a float32 reference copy for KL."""
  return params_b * 1e9 * bytes_per_param / 2**30


SUGGESTIONS: dict[str, Suggestion] = {s.model: s for s in (
    Suggestion("qwen3_0_6b", "v4-8", "data=-1,fsdp=1", "v5litepod-8 with data=2,fsdp=4",
               "The paper's model. ~11 GiB of train state fits one 32 GiB v4 chip, so pure data parallelism; on "
               "16 GiB v5e chips shard it (fsdp=4). Long rollouts need a bigger slice: see estimate_memory."),
    Suggestion("qwen3_1_7b", "v4-8", "data=1,fsdp=4", "v5litepod-8 with data=1,fsdp=8",
               "~32 GiB of train state: shard parameters and optimizer over the host's chips."),
    Suggestion("qwen3_4b", "v4-16", "data=1,fsdp=8", "v5p-8 with data=1,fsdp=4",
               "~75 GiB of train state: two v4 hosts (multi-host), or one v5p host with 95 GiB chips; "
               "consider --set dtype=bfloat16 for activations."),
    Suggestion("qwen3_8b", "v4-32", "data=1,fsdp=16", "v5p-16 with data=1,fsdp=8",
               "~153 GiB of train state (untied embeddings): four v4 hosts. Beyond ~30B parameters the trainer would "
               "need a tensor-parallel axis, which it does not have (only data and fsdp)."),
)}


# Slices `suggest_for_config` considers, smallest first (v4 before v5p at equal chip counts).
CANDIDATES = tuple(f"v4-{n}" for n in (8, 16, 32, 64, 128, 256, 512)) + tuple(
    f"v5p-{n}" for n in (8, 16, 32, 64, 128, 256, 512))
HEADROOM = 0.75  # the share of a chip's memory an estimate may use (XLA temporaries, fragmentation)


def suggest_for_config(cfg) -> tuple[str, str, MemoryEstimate] | None:
  """The smallest slice, and on it the smallest fsdp, whose chips hold the train state plus the larger of the
  rollouts' KV cache and the train step's activations (`MemoryEstimate.peak`) of one step of `cfg` (a trainer
  `TrainConfig`) within `HEADROOM` of their memory.

  Slices whose device count does not divide `batch_size` (or a micro-batch's `micro_batch_prompts * num_samples`
  rows, which the trainer refuses) are skipped. Returns (accelerator, mesh, estimate), or None when the model's
  shapes are unknown here or no candidate fits (then a smaller `batch_size`, `num_samples` or sequence length, or
  `micro_batch_prompts` / `logprob_chunk` / `model_overrides="remat=true,attention_query_chunk=512"`, is needed).
  """
  dims = MODEL_DIMS.get(model_key(cfg.model, cfg.model_path))
  if dims is None:
    return None
  for name in CANDIDATES:
    acc = parse_accelerator(name)
    micro_rows = getattr(cfg, "micro_batch_prompts", 0) * cfg.num_samples
    if cfg.batch_size % acc.devices or micro_rows % acc.devices:
      continue
    fsdp = 1
    while fsdp <= acc.devices:
      mesh = {"data": acc.devices // fsdp, "fsdp": fsdp}
      estimate = estimate_for_config(cfg, acc, mesh)
      if estimate.peak <= HEADROOM * acc.family.hbm_gib_per_device:
        return name, f"data={mesh['data']},fsdp={fsdp}", estimate
      fsdp *= 2
  return None


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


def paper_table(config_names: list[str]) -> str:
  """The Markdown table of launch/TPU.md's "Paper runs": each config's suggested slice and memory estimate."""
  from tsallis_jax.train.config import load_config  # the trainer's configs (imports JAX via the package)
  lines = ["| config | rows per step (B x G) | tokens per row | slice | mesh | state / KV / train-step activations, "
           "GiB per device |", "| --- | --- | --- | --- | --- | --- |"]
  for name in config_names:
    cfg = load_config(name)
    pick = suggest_for_config(cfg)
    if pick is None:
      lines.append(f"| {name} | {cfg.batch_size} x {cfg.num_samples} | {cfg.total_len(THINK_CLOSE_LEN)} | none fits"
                   " | | |")
      continue
    acc, mesh, est = pick
    lines.append(f"| {name} | {cfg.batch_size} x {cfg.num_samples} | {cfg.total_len(THINK_CLOSE_LEN)} | {acc} |"
                 f" {mesh} | {est.state:.1f} / {est.rollout_kv:.1f} / {est.train_activations:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":  # python -m launch.slices paper_finqa paper_hotpotqa paper_musique
  import sys
  print(paper_table(sys.argv[1:] or ["paper_finqa", "paper_hotpotqa", "paper_musique"]))
