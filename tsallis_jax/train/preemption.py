"""Preemption notices: stop at the next step boundary with a checkpoint, and exit with a status that means "resume".

A notice is
  * one host: SIGTERM (what a spot / preemptible VM and most schedulers send before the kill). Our handler only sets
    a flag; a second SIGTERM gets the previous handler (the default: terminate at once).
  * multi-host (`jax.distributed` initialised with the preemption service, JAX's default): JAX's own notifier owns
    SIGTERM; any host's notice makes every host reach `multihost_utils.reached_preemption_sync_point` at the same
    step, so all of them save the same checkpoint. We install no handler then (it would hide SIGTERM from JAX).

`train_and_evaluate` asks `Watcher.requested(step)` after every step; on True it writes the pending metrics, saves a
checkpoint of that step (unless it was just saved), closes the writers and raises `Preempted`. The CLI turns that
into exit status `PREEMPTED_EXIT_STATUS` (75, EX_TEMPFAIL of sysexits.h: "temporary failure, run me again"), which
`launch/host.sh` reports and `python -m launch.tpu up --retries N` answers by running the same command again.
At most the step in flight when the notice arrived is redone; nothing else is lost.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)

PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
  """`train_and_evaluate` stopped after a preemption notice; the checkpoint of `step` is in `workdir`."""

  def __init__(self, step: int, workdir: str):
    self.step, self.workdir = step, str(workdir)
    super().__init__(f"saved the checkpoint of step {step} in {workdir} after a preemption notice; run the same "
                     "command again to resume from it")


class Watcher:
  """Context manager that turns a preemption notice into `requested(step) == True` at a step boundary."""

  def __init__(self):
    self._notice = False
    self._previous = None
    self._multihost = False

  def __enter__(self) -> "Watcher":
    self._multihost = jax.process_count() > 1
    if not self._multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del frame
    self._notice = True
    signal.signal(signum, self._previous)  # a second SIGTERM is not deferred
    self._previous = None
    log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting with status %d",
                PREEMPTED_EXIT_STATUS)

  def requested(self, step: int) -> bool:
    """True when the run should checkpoint `step` and stop. Multi-host: call it at every step on every process."""
    if self._multihost:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
        return False
    return self._notice
