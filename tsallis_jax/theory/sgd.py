"""The discrete-time, finite-sample counterpart of the escape theorem: SGD with the estimators on the softmax toy.

Spec 1.5 (Thms 5.1-5.2) meets spec 1.6 (GARL eq. 12, PAFT eq. 14) and spec 2.6 (GRPO): each step draws M rollouts
from the current policy, forms the core's `garl_grad` / `paft_grad` / `grpo_grad`, and takes a plain SGD step with the
same learning rate for every method; we count the steps until the exact P reaches delta (capped at max_steps).

Two weightings of the same K-trajectory softmax toy (see `toys.py`):
  * binary:     w = 1 on the C correct trajectories, 0 elsewhere (a 0/1 verifier); GRPO's reward is the same bit.
  * likelihood: w_z = sigmoid(phi_z), learnable; GARL and PAFT use w (Rao-Blackwellised), while GRPO samples an
                answer y ~ Bernoulli(w_z) and is rewarded 1(y = y*), training log p(z) + log p(y|z) (spec 2.6).
GARL and PAFT follow Algorithms 1-2 (the 1/M^q factor on) unless normalize_by_Mq=False (eq. 12/14 as written, the
discretised flow).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tsallis_jax.estimators import garl_grad, grpo_grad, paft_grad
from tsallis_jax.qlog import check_q
from tsallis_jax.theory import toys

__all__ = ["METHODS", "REWARDS", "init_toy", "sgd_escape_steps"]

METHODS = ("garl", "paft", "grpo")
REWARDS = ("binary", "likelihood")


def init_toy(p0: float, *, num_trajectories: int, num_correct: int, reward: str) -> dict:
  """Toy params with exact P = p0: symmetric softmax logits (binary) or `toys.likelihood_toy_init` (likelihood)."""
  if reward == "binary":
    return toys.binary_toy_params(toys.softmax_toy_init(p0, num_trajectories=num_trajectories,
                                                        num_correct=num_correct))
  return toys.likelihood_toy_init(p0, num_trajectories=num_trajectories, num_correct=num_correct)


def _grpo_likelihood_logprob_fn(params: dict, batch: dict):
  """GRPO's sequence log-prob on the likelihood toy: log pi(z) + log p(y|z), y the sampled answer."""
  logp_z_BxG, logw_BxG = toys.likelihood_toy_logprob_fn(params, batch)
  log_not_w_BxG = jax.nn.log_sigmoid(-params["answer_logits_K"])[batch["z_BxG"]]
  return logp_z_BxG + jnp.where(batch["answer_correct_BxG"], logw_BxG, log_not_w_BxG), logw_BxG


@functools.partial(jax.jit, static_argnames=("method", "reward", "num_samples", "normalize_by_Mq", "baseline"))
def _run_seeds(params0, correct_K, q, learning_rate, log_delta, max_steps, keys_S, *, method, reward, num_samples,
               normalize_by_Mq, baseline):
  """One SGD run per key (vmapped lax.while_loop); returns the step at which log P first reached log_delta."""
  if reward == "binary":
    logprob_fn = toys.binary_toy_logprob_fn
    log_success = lambda p: toys.binary_toy_log_success(p, correct_K)
  else:
    logprob_fn = toys.likelihood_toy_logprob_fn
    log_success = toys.likelihood_toy_log_success

  def gradient(params, key):
    sample_key, answer_key, resample_key = jax.random.split(key, 3)
    z_BxG = jax.random.categorical(sample_key, params["logits_K"], shape=(1, num_samples))
    batch = {"z_BxG": z_BxG, "correct_K": correct_K}
    if method == "garl":
      return garl_grad(logprob_fn, params, batch, q=q, baseline=baseline, normalize_by_Mq=normalize_by_Mq)[0]
    if method == "paft":
      return paft_grad(logprob_fn, params, batch, resample_key, q=q, normalize_by_Mq=normalize_by_Mq)[0]
    if reward == "binary":
      rewards_BxG = correct_K[z_BxG].astype(jnp.float32)
      return grpo_grad(logprob_fn, params, batch, rewards_BxG=rewards_BxG)[0]
    w_BxG = jnp.exp(toys.likelihood_toy_logprob_fn(params, batch)[1])
    answer_correct_BxG = jax.random.uniform(answer_key, z_BxG.shape) < w_BxG
    batch = {**batch, "answer_correct_BxG": answer_correct_BxG}
    return grpo_grad(_grpo_likelihood_logprob_fn, params, batch,
                     rewards_BxG=answer_correct_BxG.astype(jnp.float32))[0]

  def run(key):
    def cond(state):
      params, step, _ = state
      return (log_success(params) < log_delta) & (step < max_steps)

    def body(state):
      params, step, key = state
      key, step_key = jax.random.split(key)
      grads = gradient(params, step_key)
      params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
      return params, step + 1, key

    _, steps, _ = jax.lax.while_loop(cond, body, (params0, jnp.int32(0), key))
    return steps

  return jax.vmap(run)(keys_S)


def sgd_escape_steps(method: str, q: float, p0: float, *, num_samples: int, num_trajectories: int = 10,
                     num_correct: int = 1, reward: str = "binary", learning_rate: float = 1.0,
                     max_steps: int = 2000, num_seeds: int = 8, delta: float = 0.5, seed: int = 0,
                     normalize_by_Mq: bool = True, baseline: str = "rloo") -> np.ndarray:
  """Steps of SGD until P >= delta, one entry per seed; runs that hit the cap report max_steps (did not escape).

  Args:
    method: 'garl' (baseline 'rloo' or 'none'), 'paft' (K = M resamples) or 'grpo' (TRL defaults: group std,
      unbiased, on-policy, no KL; q is ignored).
    q: commitment for GARL / PAFT.
    p0: initial P (symmetric initialisation); num_samples: M rollouts per step, the same for every method.
    reward: 'binary' or 'likelihood' (see the module docstring).
    learning_rate: plain SGD step size, the same for every method.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if reward not in REWARDS:
    raise ValueError(f"reward must be one of {REWARDS}, got {reward!r}.")
  check_q(q)
  toys.check_p0(p0, delta)
  if num_samples < 2:
    raise ValueError(f"num_samples (M) must be >= 2 (RLOO and GRPO need a group), got {num_samples}.")
  params0 = init_toy(p0, num_trajectories=num_trajectories, num_correct=num_correct, reward=reward)
  correct_K = jnp.arange(num_trajectories) < num_correct
  keys_S = jax.random.split(jax.random.key(seed), num_seeds)
  steps_S = _run_seeds(params0, correct_K, jnp.float32(q), jnp.float32(learning_rate), jnp.float32(np.log(delta)),
                       jnp.int32(max_steps), keys_S, method=method, reward=reward, num_samples=num_samples,
                       normalize_by_Mq=normalize_by_Mq, baseline=baseline)
  return np.asarray(steps_S)
