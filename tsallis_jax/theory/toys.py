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
