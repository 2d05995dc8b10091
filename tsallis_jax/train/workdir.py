"""One run per workdir, and a workdir that can take a checkpoint, checked before training starts.

`hold(workdir)` (used by `train_and_evaluate`) does, on process 0:
  1. a write probe: writes, syncs and deletes a `PROBE_BYTES` file in the workdir, so an unwritable, read-only or
     full workdir fails in seconds with one clear line instead of at the first checkpoint;
  2. the lock: `workdir/run.lock` (JSON: host, pid, start time, heartbeat), created with O_EXCL on a local disk. A
     lock held by a live process is a `WorkdirError` naming that host and pid. A stale lock is replaced with a
     warning: same host and the pid is not alive (a run killed with SIGKILL), or another host whose heartbeat
     (rewritten every `HEARTBEAT_S` by a daemon thread) is older than `STALE_AFTER_S` (a slice lost without notice).
     On an object store (gs://) there is no O_EXCL: the check and the write are separate, best effort.
The lock is removed when the run ends, also by an exception or a preemption. Every process of a multi-host job
learns process 0's verdict, so all raise together. `check_free_space` (local workdirs) runs once the checkpoint's
size is known. A checkpoint save that fails (disk full mid-run) never removes the previous checkpoint: see
`checkpoint.Checkpointer.save`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import threading
import time
from typing import Any, Iterator

import jax
from etils import epath

from tsallis_jax.errors import InputError
from tsallis_jax.train.checkpoint import is_remote, resolve_workdir

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
PROBE_BYTES = 4 << 20
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class WorkdirError(InputError):
  """The workdir cannot take this run: another live run holds it, or it cannot be written."""


def check_writable(workdir: str | os.PathLike, nbytes: int = PROBE_BYTES) -> None:
  """Writes, syncs and removes an `nbytes` probe file in `workdir`; raises `WorkdirError` if any of it fails."""
  workdir = resolve_workdir(workdir)
  probe = workdir / f".write_probe-{socket.gethostname()}-{os.getpid()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if is_remote(workdir):
      probe.write_bytes(b"\0" * nbytes)
    else:
      with open(os.fspath(probe), "wb") as f:
        f.write(b"\0" * nbytes)
        f.flush()
        os.fsync(f.fileno())
  except OSError as e:
    with contextlib.suppress(OSError):
      probe.unlink()
    raise WorkdirError(
        f"workdir {workdir} cannot be written ({type(e).__name__}: {e.strerror or e}; a {nbytes >> 20} MiB probe "
        "failed): free space on its disk, make it writable, or pass another --workdir") from None
  with contextlib.suppress(OSError):
    probe.unlink()


def check_free_space(workdir: str | os.PathLike, nbytes: int) -> None:
  """Raises `WorkdirError` when a local workdir's disk has less than `nbytes` free (object stores are not checked)."""
  workdir = resolve_workdir(workdir)
  if is_remote(workdir):
    return
  free = shutil.disk_usage(os.fspath(workdir)).free
  if free < nbytes:
    raise WorkdirError(f"workdir {workdir} has {free / 2**20:.1f} MiB free but a checkpoint (latest and best) needs "
                       f"{nbytes / 2**20:.1f} MiB: free space on its disk or pass another --workdir")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
  """A lock whose holder is gone: same host and dead pid, or another host silent for `STALE_AFTER_S`."""
  if holder.get("host") == socket.gethostname():
    return not _pid_alive(int(holder.get("pid", -1)))
  return (now or time.time()) - float(holder.get("heartbeat", 0.0)) > STALE_AFTER_S


def _describe(holder: dict[str, Any]) -> str:
  return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started', '?')})"


class Lock:
  """The workdir's `run.lock`, held by this process until `release`."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = resolve_workdir(workdir) / LOCK_NAME
    self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _text(self) -> str:
    return json.dumps({**self.info, "heartbeat": time.time()})

  def _read(self) -> dict[str, Any] | None:
    try:
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable (cut by a kill mid-write): treated as stale below
    return holder if isinstance(holder, dict) else {}

  def _create(self) -> bool:
    """Creates the lock file; False when it exists."""
    if is_remote(self.path):
      if self.path.exists():
        return False
      self.path.write_text(self._text())
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self._text())
    return True

  def acquire(self) -> "Lock":
    for _ in range(3):
      if self._create():
        break
      holder = self._read()
      if holder is None:
        continue  # released between our two calls
      if holder and not is_stale(holder):
        raise WorkdirError(
            f"workdir {self.path.parent} is in use by {_describe(holder)}: two runs would interleave checkpoints "
            f"and metrics. Wait for it, stop it, or pass another --workdir (if that run is gone, delete {self.path})")
      log.warning("replacing the stale lock %s of %s", self.path, _describe(holder) if holder else "(unreadable)")
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
    else:
      raise WorkdirError(f"could not create {self.path} after removing a stale lock three times; another run is "
                         "starting in the same workdir? Pass another --workdir")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        if is_remote(self.path):
          self.path.write_text(self._text())
        else:
          tmp = self.path.parent / f"{LOCK_NAME}.{os.getpid()}.tmp"
          tmp.write_text(self._text())
          os.replace(os.fspath(tmp), os.fspath(self.path))

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read()
    if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()


def _agree(ok: bool) -> bool:
  """Process 0's verdict, on every process of a multi-host job."""
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
  """Write probe and lock (process 0) around a run in `workdir`; see the module docstring."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      check_writable(workdir)
      lock = Lock(workdir).acquire()
    except WorkdirError as e:
      error = e
  if not _agree(error is None):
    raise error or WorkdirError(f"process 0 could not use workdir {epath.Path(workdir)}; its log says why")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
