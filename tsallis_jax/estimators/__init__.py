"""Monte Carlo gradient estimators of J_Q (spec 1.6, 2.2-2.3) and the GRPO baseline (spec 2.6).

Each estimator has a surrogate loss over arrays, `(loss, aux)`, for use inside a trainer's jitted step, and a
`*_grad(logprob_fn, params, batch, ...) -> (grads, aux)` wrapper. Gradients are of the loss (descent = -grads).
"""
from tsallis_jax.estimators.garl import garl_grad, garl_loss
from tsallis_jax.estimators.grpo import grpo_advantages, grpo_grad, grpo_loss, k3_kl
from tsallis_jax.estimators.paft import paft_grad, paft_loss, resample_counts
from tsallis_jax.estimators.types import SequenceLogProbs, as_pair

__all__ = [
  "SequenceLogProbs",
  "as_pair",
  "garl_grad",
  "garl_loss",
  "grpo_advantages",
  "grpo_grad",
  "grpo_loss",
  "k3_kl",
  "paft_grad",
  "paft_loss",
  "resample_counts",
]
