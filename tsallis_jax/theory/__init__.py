"""Gradient-flow theory of the J_Q family checked on toy models, built on `tsallis_jax.jq_loss` (spec 1.3, 1.5).

Modules: `toys` (sigmoid model, softmax policy over K trajectories), `escape` (escape times: closed forms and ODE
flow), `landscape` (escort minimiser, dispersion penalty), `noise` (label-noise toy), `bias` (estimator bias study),
`sgd` (discrete-time, finite-sample escape with the estimators).
"""
from tsallis_jax.theory.bias import (
  binary_shrinkage,
  delta_method_shrinkage,
  likelihood_bias_coefficient,
  measure_bias,
)
from tsallis_jax.theory.escape import (
  escape_integral,
  escape_time,
  escape_time_asymptotic,
  log_log_slope,
  sigmoid_escape_time,
  simulate_escape_time,
  simulate_sigmoid_escape_time,
)
from tsallis_jax.theory.landscape import (
  categorical_qloss,
  dispersion_penalty,
  dispersion_second_order,
  escort_minimiser,
)
from tsallis_jax.theory.noise import (
  noise_drift,
  noise_equilibrium,
  noise_equilibrium_numerical,
  noise_objective,
  noise_time_asymptotic,
  noise_time_scale,
  noise_time_to_contamination,
  simulate_noise_flow,
  simulate_noise_time,
)
from tsallis_jax.theory.sgd import init_toy, sgd_escape_steps
from tsallis_jax.theory.toys import (
  binary_toy_log_success,
  binary_toy_logprob_fn,
  binary_toy_params,
  likelihood_toy_init,
  likelihood_toy_log_success,
  likelihood_toy_logprob_fn,
  sigmoid_toy_init,
  sigmoid_toy_log_success,
  softmax_toy_init,
  softmax_toy_log_success,
  softmax_toy_score_scale,
)
