"""Compiling the train step in a background thread while the first rollout runs (the trainer's first step, `loop.py`).

A run's first step compiles two large programs one after the other: the sampler (traced and compiled at the first
rollout) and the train step (at the first update). XLA:CPU compiles a program on about one core, so on a machine
with two or more the train step's compile can run beside the rollout's compile and execution instead of after them.
`AheadOfTime.start(state, batch, key, q_range)` lowers and compiles the jitted step for those argument shapes in a
daemon thread (`jax.stages.Lowered.compile`, which releases the GIL); the first call whose batch, key and q_range have
those shapes and dtypes waits for it and runs the compiled executable, and so does every later call with them.
Calls with other shapes (another prompt bucket) go through the jitted function as before, compiling on first use.

The compiled program is the one the jitted call would compile (same function, shardings and donation; the
persistent compilation cache is read and written the same way), so results are bit-identical
(`tests/test_compile_ahead.py`). A compile that fails in the thread raises its error at that first call.

A process that ends while such a compile is still running (the first step raised, e.g. a device out of memory, or
the script returned early) first waits for it, up to `EXIT_WAIT_S` (an exit handler): a daemon thread killed inside
XLA's compiler aborts the interpreter ("terminate called after throwing an instance of ...") after the real error.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import threading
from typing import Any, Callable

import jax

#: Seconds an exiting process waits for a compile still running in the background (`_wait_at_exit`).
EXIT_WAIT_S = 600.0
_running: set[threading.Thread] = set()


@atexit.register
def _wait_at_exit() -> None:
  """Joins the compiles still running (atexit handlers run before daemon threads are stopped)."""
  for thread in list(_running):
    thread.join(EXIT_WAIT_S)


def abstract(x: Any) -> Any:
  """The shape, dtype and weak type a compile fixes of an array (a `jax.ShapeDtypeStruct` is returned as it is)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=bool(getattr(x, "weak_type", False)))


def signature(tree: Any) -> tuple:
  """What a compiled program fixes about its arguments: the tree structure and every leaf's shape, dtype and weak
  type (shardings are fixed by the jitted function's `in_shardings`)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), x.dtype, bool(getattr(x, "weak_type", False))) for x in leaves)


class AheadOfTime:
  """`jitted(state, batch, key, q_range)` with compiles started ahead of the first call (`start`).

  `mesh` is the mesh the step is lowered under (`jax.set_mesh`), as the jitted call runs. Only the batch, key and
  q_range take part in the match: the state's shapes are the step's own output and never change within a run.
  """

  def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh):
    self._jitted = jitted
    self._mesh = mesh
    self._compiled: dict[tuple, concurrent.futures.Future] = {}
    self._lock = threading.Lock()

  def start(self, state: Any, batch: Any, key: Any, q_range: Any) -> concurrent.futures.Future:
    """Starts compiling for these arguments' shapes (arrays or `jax.ShapeDtypeStruct`s) in a daemon thread and
    returns at once; a second start for the same shapes returns the first one's future."""
    sig = signature((batch, key, q_range))
    with self._lock:
      if sig in self._compiled:
        return self._compiled[sig]
      future: concurrent.futures.Future = concurrent.futures.Future()
      self._compiled[sig] = future
    args = jax.tree.map(abstract, (state, batch, key, q_range))

    def compile_step():
      try:
        with jax.set_mesh(self._mesh):
          future.set_result(self._jitted.lower(*args).compile())
      except BaseException as err:  # noqa: BLE001  handed to the caller at its first call
        future.set_exception(err)
      finally:
        _running.discard(threading.current_thread())
    thread = threading.Thread(target=compile_step, name="tsallis_jax-compile-ahead", daemon=True)
    _running.add(thread)
    thread.start()
    return future

  def __call__(self, state, batch, key, q_range):
    with self._lock:
      future = self._compiled.get(signature((batch, key, q_range))) if self._compiled else None
    with jax.set_mesh(self._mesh):
      if future is None:
        return self._jitted(state, batch, key, q_range)
      return future.result()(state, batch, key, q_range)
