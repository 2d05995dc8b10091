"""The log-prob contract between a model and the estimators (spec 1.6, 2.2).

An estimator consumes, per prompt b and sample g, the rationale log-likelihood log p(z|x) and the log weight
log w = log p(y*|x, z) (a 0/1 verifier is log w in {0, -inf}). Models return either

* the pair form `(logp_z_BxG, logw_BxG)`, sequence-level sums (toy models, the theory, GARL and PAFT), or
* a `SequenceLogProbs`, per-token values and masks, which GRPO needs for token-level aggregation and its PPO ratio
  and k3 KL, and which GARL and PAFT reduce to the pair form by masked sums over tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SequenceLogProbs", "as_pair", "LogProbs"]


_FIELDS = ("logp_z_BxGxT", "mask_z_BxGxT", "logp_y_BxGxT", "mask_y_BxGxT", "old_logp_z_BxGxT", "ref_logp_z_BxGxT")


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_FIELDS), meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SequenceLogProbs:
  """Per-token log-probs of G sampled rationales per prompt, with optional answer tokens and PPO / KL references.

  Attributes:
    logp_z_BxGxT: log p_theta(z_t | x, z_<t) of each rationale token, differentiable in params.
    mask_z_BxGxT: 1 on real rationale tokens, 0 on padding.
    logp_y_BxGxT: log p_theta(y*_t | x, z, y*_<t), the teacher-forced gold-answer tokens after each rationale
      (their T may differ from the rationale's); its masked sum is log w. None when the weight is a reward.
    mask_y_BxGxT: mask of the answer tokens; required with `logp_y_BxGxT`.
    old_logp_z_BxGxT: rationale log-probs under the sampling policy (GRPO's PPO ratio); None means on-policy.
    ref_logp_z_BxGxT: rationale log-probs under the reference policy (GRPO's k3 KL); None means no KL.
  """
  logp_z_BxGxT: jax.Array
  mask_z_BxGxT: jax.Array
  logp_y_BxGxT: jax.Array | None = None
  mask_y_BxGxT: jax.Array | None = None
  old_logp_z_BxGxT: jax.Array | None = None
  ref_logp_z_BxGxT: jax.Array | None = None

  def replace(self, **changes) -> "SequenceLogProbs":
    """A copy with some fields changed (frozen dataclass)."""
    return dataclasses.replace(self, **changes)

  def check_shapes(self) -> None:
    """Raises ValueError on inconsistent shapes; the estimators call it (not __init__, so pytree maps work)."""
    if self.logp_z_BxGxT.ndim != 3 or self.logp_z_BxGxT.shape != self.mask_z_BxGxT.shape:
      raise ValueError(
          f"SequenceLogProbs: logp_z_BxGxT {self.logp_z_BxGxT.shape} and mask_z_BxGxT {self.mask_z_BxGxT.shape} "
          "must be equal rank-3 shapes (prompts, samples, tokens).")
    if (self.logp_y_BxGxT is None) != (self.mask_y_BxGxT is None):
      raise ValueError("SequenceLogProbs: pass logp_y_BxGxT and mask_y_BxGxT together, or neither.")
    if self.logp_y_BxGxT is not None:
      if (self.logp_y_BxGxT.shape != self.mask_y_BxGxT.shape or self.logp_y_BxGxT.ndim != 3
          or self.logp_y_BxGxT.shape[:2] != self.logp_z_BxGxT.shape[:2]):
        raise ValueError(
            f"SequenceLogProbs: logp_y_BxGxT {self.logp_y_BxGxT.shape} / mask_y_BxGxT {self.mask_y_BxGxT.shape} "
            f"must share (B, G) = {self.logp_z_BxGxT.shape[:2]} with the rationale tokens.")
    for name in ("old_logp_z_BxGxT", "ref_logp_z_BxGxT"):
      value = getattr(self, name)
      if value is not None and value.shape != self.logp_z_BxGxT.shape:
        raise ValueError(f"SequenceLogProbs: {name} {value.shape} must match logp_z_BxGxT "
                         f"{self.logp_z_BxGxT.shape}.")

  def sequence_logp_z(self) -> jax.Array:
    """log p(z|x) per sample: the masked float32 sum over rationale tokens."""
    mask = self.mask_z_BxGxT.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, self.logp_z_BxGxT.astype(jnp.float32), 0.0), axis=-1)

  def sequence_logw(self) -> jax.Array:
    """log w = log p(y*|x, z) per sample: the masked float32 sum over answer tokens."""
    if self.logp_y_BxGxT is None:
      raise ValueError("SequenceLogProbs has no answer tokens (logp_y_BxGxT); GARL and PAFT need log w: "
                       "fill logp_y_BxGxT/mask_y_BxGxT or return the pair (logp_z_BxG, logw_BxG).")
    mask = self.mask_y_BxGxT.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, self.logp_y_BxGxT.astype(jnp.float32), 0.0), axis=-1)


LogProbs = Any  # a (logp_z_BxG, logw_BxG) pair or a SequenceLogProbs


def as_pair(log_probs: LogProbs) -> tuple[jax.Array, jax.Array]:
  """Reduces a `logprob_fn` output to the pair form (logp_z_BxG, logw_BxG), float32."""
  if isinstance(log_probs, SequenceLogProbs):
    log_probs.check_shapes()
    return log_probs.sequence_logp_z(), log_probs.sequence_logw()
  if isinstance(log_probs, (tuple, list)) and len(log_probs) == 2:
    logp_z_BxG, logw_BxG = log_probs
    return jnp.asarray(logp_z_BxG, jnp.float32), jnp.asarray(logw_BxG, jnp.float32)
  raise ValueError(f"logprob_fn must return (logp_z_BxG, logw_BxG) or a SequenceLogProbs, got "
                   f"{type(log_probs).__name__}.")
