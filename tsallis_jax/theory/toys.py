"""Toy models of the gradient-flow theory: the sigmoid model and the softmax policy over K trajectories.

Spec App. C.1 (sigmoid warm-up, P = sigmoid(theta)) and spec 2.7 (softmax over K complete trajectories, C of them
correct, P = sum of the correct probabilities). Both are written as log-success functions `theta -> log P`, so the
exact loss is `jq_loss(log_success(theta), q)` and its autograd gradient drives the flows of `escape.py`.

Symmetric initialisation (spec 2.7): the C correct logits are equal and the K - C wrong logits are equal (zero), so
symmetry is preserved by the flow and P obeys the scalar ODE pdot = K/(C(K-C)) p^(2-q) (1-p)^2.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "check_toy_shape",
  "check_p0",
  "softmax_toy_init",
  "softmax_toy_log_success",
  "softmax_toy_score_scale",
  "sigmoid_toy_init",
  "sigmoid_toy_log_success",
  "binary_toy_params",
  "binary_toy_logprob_fn",
  "binary_toy_log_success",
  "likelihood_toy_init",
  "likelihood_toy_logprob_fn",
  "likelihood_toy_log_success",
]


def check_toy_shape(num_trajectories: int, num_correct: int) -> None:
  """Raises ValueError unless 1 <= num_correct < num_trajectories (integers): the toy needs a wrong trajectory."""
  for name, value in (("num_trajectories", num_trajectories), ("num_correct", num_correct)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(f"{name} must be an int, got {type(value).__name__}: {value!r}.")
  if num_correct < 1:
    raise ValueError(f"num_correct must be >= 1, got {num_correct}; the toy needs a correct trajectory.")
  if num_correct >= num_trajectories:
    raise ValueError(
      f"num_correct={num_correct} must be < num_trajectories={num_trajectories} (C < K): with no wrong "
      "trajectory P = 1 and nothing can escape; add wrong trajectories or lower num_correct.")


def check_p0(p0: float, delta: float) -> None:
  """Raises ValueError unless 0 < delta < 1 and 0 < p0 < delta (finite floats)."""
  for name, value in (("p0", p0), ("delta", delta)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
      raise ValueError(f"{name} must be a finite real number, got {value!r}.")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must lie in (0, 1), got delta={delta!r}; the spec uses delta = 1/2.")
  if not 0.0 < p0 < delta:
    raise ValueError(
      f"p0 must lie in (0, delta) = (0, {delta}), got p0={p0!r}; the escape time from p0 >= delta is 0 and "
      "p0 = 0 never escapes.")


def softmax_toy_init(p0: float, *, num_trajectories: int, num_correct: int = 1) -> np.ndarray:
  """Logits theta_K with the C correct logits equal to a, the wrong ones 0, and P = p0 (spec 2.7).

  a = log(p0 (K - C) / (C (1 - p0))), so that C e^a / (C e^a + K - C) = p0. Returned as float64 numpy.
  """
  check_toy_shape(num_trajectories, num_correct)
  if not 0.0 < p0 < 1.0:
    raise ValueError(f"p0 must lie in (0, 1), got {p0!r}.")
  a = math.log(p0) - math.log1p(-p0) + math.log(num_trajectories - num_correct) - math.log(num_correct)
  theta_K = np.zeros(num_trajectories, np.float64)
  theta_K[:num_correct] = a
  return theta_K


def softmax_toy_log_success(theta_K: jax.Array, *, num_correct: int) -> jax.Array:
  """log P = logsumexp(theta over the first C (correct) trajectories) - logsumexp(theta) (spec 2.7)."""
  theta_K = jnp.asarray(theta_K)
  return jax.nn.logsumexp(theta_K[:num_correct]) - jax.nn.logsumexp(theta_K)


def softmax_toy_score_scale(*, num_trajectories: int, num_correct: int = 1) -> float:
  """The factor K/(C(K-C)) in pdot = K/(C(K-C)) p^(2-q) (1-p)^2 under symmetric initialisation (spec 2.7)."""
  check_toy_shape(num_trajectories, num_correct)
  return num_trajectories / (num_correct * (num_trajectories - num_correct))


def sigmoid_toy_init(p0: float) -> np.ndarray:
  """The scalar logit theta = logit(p0) of the sigmoid model, as a float64 array of shape (1,) (spec App. C.1)."""
  if not 0.0 < p0 < 1.0:
    raise ValueError(f"p0 must lie in (0, 1), got {p0!r}.")
  return np.array([math.log(p0) - math.log1p(-p0)], np.float64)


def sigmoid_toy_log_success(theta_1: jax.Array) -> jax.Array:
  """log P = log sigmoid(theta) for the sigmoid model P = sigmoid(theta) (spec App. C.1, pdot = p^(2-q)(1-p)^2)."""
  return jax.nn.log_sigmoid(jnp.asarray(theta_1)[0])


# --- the toys as policies for the Monte Carlo estimators (spec 1.6 contract: logprob_fn(params, batch)) -----------
#
# A batch holds the sampled trajectory indices `z_BxG` (G = M samples for each of B prompts; B copies of the same toy
# prompt in the studies). Two weightings of the same softmax policy over K trajectories:
#   binary:     log w = 0 on the C correct trajectories and -inf elsewhere (a 0/1 verifier, spec 2.1);
#   likelihood: log w_z = log sigmoid(phi_z), a learnable answer likelihood after trajectory z (spec 1.6 eq. 7),
#               P = sum_z pi_z w_z, and the estimators' pathwise term trains phi.


def binary_toy_params(theta_K) -> dict:
  """Params of the binary-reward softmax toy: {'logits_K': theta} (float32)."""
  return {"logits_K": jnp.asarray(theta_K, jnp.float32)}


def binary_toy_logprob_fn(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log pi(z), log R(z)) for sampled z_BxG; batch = {'z_BxG': int, 'correct_K': bool}; log R in {0, -inf}."""
  logp_K = jax.nn.log_softmax(params["logits_K"])
  z_BxG = batch["z_BxG"]
  logw_BxG = jnp.where(batch["correct_K"][z_BxG], 0.0, -jnp.inf)
  return logp_K[z_BxG], logw_BxG


def binary_toy_log_success(params: dict, correct_K: jax.Array) -> jax.Array:
  """Exact log P = logsumexp over correct trajectories of log pi."""
  logp_K = jax.nn.log_softmax(params["logits_K"])
  return jax.nn.logsumexp(jnp.where(correct_K, logp_K, -jnp.inf))


def likelihood_toy_init(p0: float, *, num_trajectories: int, num_correct: int = 1, correct_weight: float = 0.5,
                        wrong_weight_ratio: float = 0.1) -> dict:
  """Params of the likelihood-weight toy with P = p0: answer likelihood `correct_weight` after the C correct
  trajectories, `wrong_weight_ratio * p0` after the others, and symmetric policy logits chosen to make P = p0.

  pi_correct = (p0 - w_wrong)/(w_correct - w_wrong) in total; requires p0 < correct_weight.
  """
  check_toy_shape(num_trajectories, num_correct)
  if not 0.0 < p0 < correct_weight < 1.0:
    raise ValueError(f"need 0 < p0 < correct_weight < 1, got p0={p0!r}, correct_weight={correct_weight!r}.")
  if not 0.0 <= wrong_weight_ratio < 1.0:
    raise ValueError(f"wrong_weight_ratio must lie in [0, 1), got {wrong_weight_ratio!r}.")
  w_wrong = max(wrong_weight_ratio * p0, 1e-30)
  pi_correct = (p0 - w_wrong) / (correct_weight - w_wrong)
  theta_K = softmax_toy_init(pi_correct, num_trajectories=num_trajectories, num_correct=num_correct)
  phi_K = np.full(num_trajectories, math.log(w_wrong) - math.log1p(-w_wrong))
  phi_K[:num_correct] = math.log(correct_weight) - math.log1p(-correct_weight)
  return {"logits_K": jnp.asarray(theta_K, jnp.float32), "answer_logits_K": jnp.asarray(phi_K, jnp.float32)}


def likelihood_toy_logprob_fn(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log pi(z), log sigmoid(phi_z)) for sampled z_BxG; batch = {'z_BxG': int}."""
  logp_K = jax.nn.log_softmax(params["logits_K"])
  logw_K = jax.nn.log_sigmoid(params["answer_logits_K"])
  z_BxG = batch["z_BxG"]
  return logp_K[z_BxG], logw_K[z_BxG]


def likelihood_toy_log_success(params: dict) -> jax.Array:
  """Exact log P = logsumexp_z (log pi_z + log sigmoid(phi_z))."""
  return jax.nn.logsumexp(jax.nn.log_softmax(params["logits_K"]) + jax.nn.log_sigmoid(params["answer_logits_K"]))
