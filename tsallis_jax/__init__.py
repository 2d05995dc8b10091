"""tsallis_jax: GARL and PAFT on the Tsallis loss continuum (arXiv 2604.25907) in JAX/Flax.

The core API (spec sections 1.2-1.6) is importable from here, loaded on first use (PEP 562), so `import tsallis_jax`
and its JAX-free modules (`tsallis_jax.mesh_axes`, used by the laptop-side launch wrapper) do not import JAX; model,
data and training code live in subpackages.

Importing the package also drops transformers' "PyTorch was not found" advisory (printed on every run otherwise):
this package uses transformers only for tokenizers and configs, never its PyTorch models.
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

_EXPORTS = {
  "SequenceLogProbs": "tsallis_jax.estimators",
  "garl_grad": "tsallis_jax.estimators",
  "garl_loss": "tsallis_jax.estimators",
  "grpo_advantages": "tsallis_jax.estimators",
  "grpo_grad": "tsallis_jax.estimators",
  "grpo_loss": "tsallis_jax.estimators",
  "paft_grad": "tsallis_jax.estimators",
  "paft_loss": "tsallis_jax.estimators",
  "amplification": "tsallis_jax.qlog",
  "check_q": "tsallis_jax.qlog",
  "jq_loss": "tsallis_jax.qlog",
  "q_log": "tsallis_jax.qlog",
  "q_log_of_log": "tsallis_jax.qlog",
  "validate_q_schedule": "tsallis_jax.qlog",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` loads them on first use
  from tsallis_jax.estimators import SequenceLogProbs, garl_grad, garl_loss, grpo_advantages  # noqa: F401
  from tsallis_jax.estimators import grpo_grad, grpo_loss, paft_grad, paft_loss  # noqa: F401
  from tsallis_jax.qlog import amplification, check_q, jq_loss, q_log, q_log_of_log, validate_q_schedule  # noqa: F401


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  try:  # `tsallis_jax.model` etc. after a bare `import tsallis_jax`
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))


class _NoTorchAdvisory(logging.Filter):
  """Drops transformers' import-time "PyTorch was not found" advisory, and nothing else."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


# transformers logs the advisory on the "transformers" logger while it is first imported, before any of its own
# logging settings can be applied; a filter on that logger, installed before any import of transformers from this
# package, is the one place that catches it.
if not any(isinstance(f, _NoTorchAdvisory) for f in logging.getLogger("transformers").filters):
  logging.getLogger("transformers").addFilter(_NoTorchAdvisory())
