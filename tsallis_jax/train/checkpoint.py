"""Orbax checkpoints that resume bit-exactly, with detection of damaged checkpoints.

Layout of a run folder (`workdir`)::

  workdir/checkpoints/<step>/state   params, optimizer state, step, PRNG key (StandardSave, sharded arrays)
  workdir/checkpoints/<step>/meta    JSON: data-iterator position, best-so-far validation metric, config
  workdir/best/<step>/...            the same two items for the checkpoint with the best validation maj@16
  workdir/metrics.jsonl, workdir/tb/ written by `writers.py`

What wins at start-up (the rule `train_and_evaluate` applies; also in the README):
  1. `workdir/checkpoints` holds a readable checkpoint: resume from the newest readable one (everything restored:
     params, optimizer, step, key, data position, best metric). `init_checkpoint` is ignored, with a log line.
  2. otherwise `config.init_checkpoint` is set: start at step 0 from its params (fresh optimizer and key).
  3. otherwise: the model's own initialisation (or the HF / GGUF weights named by `model_path`).

Atomicity (verified on orbax-checkpoint 0.12.8, see tests/test_checkpoint.py): orbax writes each step into a
temporary folder `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only after every item committed, and
`max_to_keep` deletes old steps only after the new step is finalised; so nothing is overwritten or removed before
a new checkpoint is complete, and a killed save leaves only a tmp folder that is never listed as a step.
A save that fails (disk full, permissions) raises `CheckpointSaveError` and leaves every earlier step in place.
A step folder that exists but cannot be read (truncated or corrupt files) is detected at restore time: we warn,
move it aside to `<step>.corrupt` (kept for inspection, never read again) and fall back to the previous step.
A readable step whose arrays have other shapes than the model's (another config, or a checkpoint written before the
weights moved to the [out, in] layout) is not damaged: restore raises `CheckpointMismatchError` and moves nothing.

Paths: the workdir may be a local folder or an object-store URI (`gs://bucket/run`, so that a preempted TPU slice
resumes from the bucket). `resolve_workdir` keeps a URI as is and makes a local path absolute; every workdir file
operation here, in `loop.py` and in `writers.py` goes through the `etils.epath.Path` it returns (orbax, tensorstore
and etils reach gs:// themselves; `os.path.abspath` would turn `gs://b/x` into a local `./gs:/b/x`).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Any, Callable, Iterable

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URI with a scheme (`gs://`, `s3://`, ...), False for a local path."""
  return bool(_URI_SCHEME.match(os.fspath(path)))


def resolve_workdir(path: str | os.PathLike) -> epath.Path:
  """The workdir as an `epath.Path`: a URI with a scheme is kept unchanged, a local path is made absolute."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint step could not be restored and an older one is used instead."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, permissions); the previous checkpoints are untouched."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint holds arrays of other shapes than the state being restored (another model config)."""


def _path_name(path: tuple) -> str:
  """'params/layers/0/mlp/gate_proj' for a pytree path, whatever its key types (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


_UNROLLED_LAYER = re.compile(r"(^|/)layers/\d+/")
_SCANNED_LAYER = re.compile(r"(^|/)layers/(attn|mlp|attn_norm|mlp_norm)(/|$)")


def _layer_layout(names: Iterable[str]) -> bool | None:
  """The `scan_layers` a tree of arrays was built with: True for stacked blocks ('layers/attn/q_proj'), False for
  one entry per layer ('layers/0/attn/q_proj'), None when it holds no decoder blocks."""
  names = list(names)
  if any(_UNROLLED_LAYER.search(n) for n in names):
    return False
  if any(_SCANNED_LAYER.search(n) for n in names):
    return True
  return None


def _check_shapes(read_metadata: Callable[[], Any], abstract: Any, what: str) -> None:
  """Raises CheckpointMismatchError when the stored arrays (metadata from `read_metadata`) differ from `abstract`'s.

  Without this check orbax's shape error would read as a damaged step, which `Checkpointer.restore` moves aside
  before falling back, so a run resumed with a changed model config would silently restart from scratch.
  Unreadable metadata is left to the restore itself (the damaged-step path).
  """
  try:
    stored = _shapes(read_metadata())
  except Exception:  # noqa: BLE001 (no readable metadata: the restore attempt decides)
    return
  wanted = _shapes(abstract)
  stored_scan, wanted_scan = _layer_layout(stored), _layer_layout(wanted)
  if None not in (stored_scan, wanted_scan) and stored_scan != wanted_scan:
    raise CheckpointMismatchError(
        f"{what} was written with scan_layers={stored_scan} (decoder blocks "
        f"{'stacked along a leading layers axis' if stored_scan else 'stored one per layer'}) but the model has "
        f"scan_layers={wanted_scan}. Restore it with model_overrides='scan_layers={str(stored_scan).lower()}' "
        "(ModelConfig.scan_layers), or convert it through a Hugging Face export (save_hf_checkpoint writes the same "
        "files from either layout). Nothing was moved or deleted.")
  diffs = [f"{name}: checkpoint {stored[name]}, model {shape}" for name, shape in wanted.items()
           if name in stored and stored[name] != shape]
  if diffs:
    raise CheckpointMismatchError(
        f"{what} was written for another model, {len(diffs)} of its arrays have other shapes "
        f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}). Use the model config that wrote it, or a "
        "new workdir. (Checkpoints written before tsallis_jax stored weights [out, in], as Hugging Face does, have "
        "every projection transposed: start those runs afresh.) Nothing was moved or deleted.")


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) that tell orbax where to place each restored array."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored(tree: Any) -> Any:
  """`tree` with each typed PRNG key (array or ShapeDtypeStruct) replaced by its raw `key_data`, which orbax saves.

  With `_unstored`, the one place where the train state's typed key meets its stored form."""
  def store(x):
    if not _is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return jax.random.key_data(x)
  return jax.tree.map(store, tree)


def _unstored(target: Any, restored: Any) -> Any:
  """Restored arrays with the leaves that are typed keys in `target` wrapped back (`wrap_key_data`)."""
  return jax.tree.map(lambda t, r: jax.random.wrap_key_data(r) if _is_key(t) else r, target, restored)


class Checkpointer:
  """The run's checkpoints: `latest` (resume, `max_to_keep`) and `best` (kept by validation metric)."""

  def __init__(self, workdir: str | os.PathLike, max_to_keep: int):
    self.workdir = resolve_workdir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
    # Handlers named up front so that a fresh process can read a step's array metadata before restoring it.
    def handlers():
      return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.latest = ocp.CheckpointManager(self.workdir / "checkpoints", options=options, item_handlers=handlers())
    best_options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
    self.best = ocp.CheckpointManager(self.workdir / "best", options=best_options, item_handlers=handlers())

  def save(self, step: int, state: Any, meta: dict[str, Any], best: bool = False) -> None:
    """Writes `state` (a pytree of arrays; typed PRNG keys as their key data) and `meta` (JSON) at `step`, into
    `best/` when `best`."""
    manager = self.best if best else self.latest
    if step in manager.all_steps():
      return
    try:
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_stored(state)),
                                                 meta=ocp.args.JsonSave(meta)))
      manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (orbax wraps OSErrors in its own types)
      kept = [s for s in manager.all_steps() if s != step]
      raise CheckpointSaveError(
          f"saving step {step} into {manager.directory} failed ({type(e).__name__}: {str(e)[:300]}); the previous "
          f"checkpoints {sorted(kept)} are untouched (orbax writes into a temporary folder and deletes old steps only "
          "after a save completes). Free space or fix permissions, then run the same command to resume") from e

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, target: Any, best: bool = False) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable step into the structure and shardings of `target` (its typed PRNG keys too).

    Returns (step, state, meta), or None when no checkpoint exists. A damaged newest step raises a
    `CorruptCheckpointWarning`, is moved aside to `<step>.corrupt` and the previous step is tried. A readable step
    whose arrays have other shapes than `target`'s raises `CheckpointMismatchError` and nothing is moved.
    """
    manager = self.best if best else self.latest
    abstract = _abstract(_stored(target))
    for step in sorted(manager.all_steps(), reverse=True):
      _check_shapes(lambda: manager.item_metadata(step)["state"], abstract,
                    f"checkpoint step {step} in {manager.directory}")
      try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or "step" not in meta or meta["step"] != step:
          raise ValueError(f"meta item of step {step} is missing or does not name step {step}")
        return step, _unstored(target, out["state"]), meta
      except Exception as e:  # noqa: BLE001 (any read failure means the step is unusable)
        path = epath.Path(manager.directory) / str(step)
        warnings.warn(
            f"checkpoint step {step} in {manager.directory} is unreadable ({type(e).__name__}: {str(e)[:300]});"
            f" moving it to {path}.corrupt and falling back to the previous checkpoint", CorruptCheckpointWarning,
            stacklevel=2)
        if jax.process_index() == 0 and path.is_dir():
          dest = path.parent / f"{step}.corrupt"
          if dest.exists():
            dest.rmtree()
          path.rename(dest)
        _sync(f"corrupt_{step}")
        manager.reload()
    return None

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def save_params(path: str | os.PathLike, params: Any) -> None:
  """Writes a params-only checkpoint (e.g. the demo's pretrained model) usable as `init_checkpoint`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(resolve_workdir(path), params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str | os.PathLike, target: Any) -> Any:
  """Reads a params-only checkpoint into the structure and shardings of `target`."""
  folder = resolve_workdir(path)
  if not folder.is_dir():
    raise FileNotFoundError(
        f"init_checkpoint {os.fspath(path)!r} does not exist; write one with save_params or clear the key")
  checkpointer = ocp.StandardCheckpointer()
  abstract = _abstract(target)
  _check_shapes(lambda: checkpointer.metadata(folder).item_metadata, abstract, f"params checkpoint {folder}")
  return checkpointer.restore(folder, abstract)
