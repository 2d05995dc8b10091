"""tsallis_jax: GARL and PAFT on the Tsallis loss continuum (arXiv 2604.25907) in JAX/Flax.

The core API (spec sections 1.2-1.6) is importable from here; model, data and training code live in subpackages and
are not imported by this module, so `import tsallis_jax` stays light.
"""
from tsallis_jax.estimators import (
  SequenceLogProbs,
  garl_grad,
  garl_loss,
  grpo_advantages,
  grpo_grad,
  grpo_loss,
  paft_grad,
  paft_loss,
)
from tsallis_jax.qlog import amplification, check_q, jq_loss, q_log, q_log_of_log, validate_q_schedule

__all__ = [
  "SequenceLogProbs",
  "garl_grad",
  "garl_loss",
  "grpo_advantages",
  "grpo_grad",
  "grpo_loss",
  "paft_grad",
  "paft_loss",
  "amplification",
  "check_q",
  "jq_loss",
  "q_log",
  "q_log_of_log",
  "validate_q_schedule",
]
