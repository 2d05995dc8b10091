"""Fuzzing with hypothesis: hostile estimator inputs give finite losses and gradients; random `--set` strings give a
valid config or a `ConfigError`, never another exception.

Estimator inputs are per-token log-probs with masks, as the train step builds them (`SequenceLogProbs`): log w with
-inf entries, values down to -1e4 (a long answer's log-likelihood) and whole zero-success groups (all -inf), every
G in [2, 8], q at 0, at 1 and in between, and masks with empty rows (a rationale or an answer of no tokens).
Gradients are taken with respect to every per-token log-prob. Examples per test are kept modest (the whole file
runs in about a minute on 2 CPU cores); each test prints how many cases it tried.
"""
import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsallis_jax import SequenceLogProbs, garl_loss, grpo_loss, paft_loss
from tsallis_jax.estimators import as_pair
from tsallis_jax.train.config import FIELDS, ConfigError, TrainConfig, apply_overrides

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
TRIED: dict[str, int] = {}

Q = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
TOKEN_LOGP = st.one_of(st.floats(-1e4, 0.0), st.sampled_from([0.0, -1e-8, -30.0]))
B, TZ, TY = 2, 3, 2  # fixed buffers, as in the train step; masks make the real lengths (0 to T) vary


@st.composite
def batches(draw):
  """A `SequenceLogProbs` with answer tokens, hostile values and masks; some groups have no success at all."""
  g = draw(st.integers(2, 8))
  logp_z = draw(hnp.arrays(np.float32, (B, g, TZ), elements=TOKEN_LOGP))
  mask_z = draw(hnp.arrays(np.bool_, (B, g, TZ)))  # rows of all False: an empty rationale
  logp_y = draw(hnp.arrays(np.float32, (B, g, TY), elements=st.one_of(TOKEN_LOGP, st.just(-np.inf))))
  mask_y = draw(hnp.arrays(np.bool_, (B, g, TY)))  # an empty answer: log w = 0
  dead = draw(hnp.arrays(np.bool_, (B,)))  # zero-success groups: log w = -inf for every sample
  logp_y[dead, :, 0] = -np.inf
  mask_y[dead, :, 0] = True
  return SequenceLogProbs(jnp.asarray(logp_z), jnp.asarray(mask_z), jnp.asarray(logp_y), jnp.asarray(mask_y))


@functools.partial(jax.jit, static_argnames=("estimator", "options"))
def _loss_and_grads(seq, q, key, *, estimator, options):
  """(loss, aux, d loss / d per-token log-probs) of one estimator, jitted once per shape and option set."""
  options = dict(options)

  def scalar(logp_z, logp_y):
    s = seq.replace(logp_z_BxGxT=logp_z, logp_y_BxGxT=logp_y)
    if estimator == "garl":
      return garl_loss(*as_pair(s), q=q, **options)
    if estimator == "paft":
      return paft_loss(*as_pair(s), key, q=q, **options)
    return grpo_loss(s.replace(logp_y_BxGxT=None, mask_y_BxGxT=None), options.pop("rewards"), **options)

  (loss, aux), grads = jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(seq.logp_z_BxGxT, seq.logp_y_BxGxT)
  return loss, aux, grads


def _assert_finite(loss, aux, grads):
  assert math.isfinite(float(loss)), float(loss)
  for name, value in aux.items():
    assert np.all(np.isfinite(np.asarray(value))), (name, value)
  for grad in grads:
    assert np.all(np.isfinite(np.asarray(grad))), grad


@FUZZ
@given(seq=batches(), q=Q, baseline=st.sampled_from(["rloo", "none"]), normalize=st.booleans())
def test_garl_loss_and_grads_are_finite(seq, q, baseline, normalize):
  TRIED["garl"] = TRIED.get("garl", 0) + 1
  options = (("baseline", baseline), ("normalize_by_Mq", normalize))
  _assert_finite(*_loss_and_grads(seq, jnp.float32(q), None, estimator="garl", options=options))


@FUZZ
@given(seq=batches(), q=Q, seed=st.integers(0, 2**31 - 1), resamples=st.sampled_from([None, 1, 5]))
def test_paft_loss_and_grads_are_finite(seq, q, seed, resamples):
  TRIED["paft"] = TRIED.get("paft", 0) + 1
  key = jax.random.key_data(jax.random.key(seed))
  options = (("num_resamples", resamples),)
  _assert_finite(*_loss_and_grads(seq, jnp.float32(q), jax.random.wrap_key_data(key), estimator="paft",
                                  options=options))


# The policy moves little between the sampling / reference policy and the current one; a drift of 20 nats per token
# is already extreme. (Beyond about 88 nats the k3 KL's exp overflowed before its log ratio was clamped: see below.)
DRIFT = st.floats(-20.0, 20.0)


@FUZZ
@given(seq=batches(), data=st.data(), loss_type=st.sampled_from(["grpo", "dr_grpo"]),
       scale=st.sampled_from(["group", "none"]), binary=st.booleans())
def test_grpo_loss_and_grads_are_finite(seq, data, loss_type, scale, binary):
  TRIED["grpo"] = TRIED.get("grpo", 0) + 1
  shape = seq.logp_z_BxGxT.shape
  elements = st.sampled_from([0.0, 1.0]) if binary else st.floats(-1e3, 1e3)
  rewards = jnp.asarray(data.draw(hnp.arrays(np.float32, shape[:2], elements=elements)))
  old = seq.logp_z_BxGxT + jnp.asarray(data.draw(hnp.arrays(np.float32, shape, elements=DRIFT)))
  ref = seq.logp_z_BxGxT + jnp.asarray(data.draw(hnp.arrays(np.float32, shape, elements=DRIFT)))
  seq = seq.replace(old_logp_z_BxGxT=jnp.minimum(old, 0.0), ref_logp_z_BxGxT=jnp.minimum(ref, 0.0))
  options = (("rewards", rewards), ("loss_type", loss_type), ("scale_rewards", scale), ("beta", 0.04))
  _assert_finite(*_loss_and_grads_grpo(seq, options))


def _loss_and_grads_grpo(seq, options):
  options = dict(options)
  rewards = options.pop("rewards")
  return _grpo_jit(seq, rewards, **options)


@functools.partial(jax.jit, static_argnames=("loss_type", "scale_rewards", "beta"))
def _grpo_jit(seq, rewards, *, loss_type, scale_rewards, beta):
  def scalar(logp_z):
    return grpo_loss(seq.replace(logp_z_BxGxT=logp_z, logp_y_BxGxT=None, mask_y_BxGxT=None), rewards,
                     loss_type=loss_type, scale_rewards=scale_rewards, beta=beta)
  (loss, aux), grad = jax.value_and_grad(scalar, has_aux=True)(seq.logp_z_BxGxT)
  return loss, aux, (grad,)


def test_grpo_k3_kl_is_finite_for_a_token_89_nats_below_the_reference():
  """Found by this suite: exp(ref - logp) overflowed float32 beyond ~88 nats; the log ratio is now clamped to 20."""
  logp = jnp.full((1, 2, 1), -89.0)
  seq = SequenceLogProbs(logp, jnp.ones((1, 2, 1), bool), ref_logp_z_BxGxT=jnp.zeros((1, 2, 1)))
  _assert_finite(*_grpo_jit(seq, jnp.zeros((1, 2)), loss_type="grpo", scale_rewards="group", beta=0.04))


# --- `--set key=value` ----------------------------------------------------------------------------------------

_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "nan", "-nan", "inf", "-inf", "1e309", "-1", "0", "1", "2", "0.5", "1.5", "true", "False",
                     "yes", " 3 ", "1_000", "0x10", "none", "a=b", "k=v,k2", "garl", "paft", "grpo", "cosine",
                     "bfloat16", "tiny", "hf", "gguf"]),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_KEYS = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=10), st.sampled_from(["qq", "Q", " q", "q "]))
_ITEMS = st.one_of(st.tuples(_KEYS, _VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=15))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(overrides=st.lists(_ITEMS, max_size=4))
def test_random_overrides_give_a_config_or_a_config_error(overrides):
  TRIED["overrides"] = TRIED.get("overrides", 0) + 1
  try:
    cfg = apply_overrides(TrainConfig(), overrides)
  except ConfigError as e:
    assert str(e)
    return
  assert isinstance(cfg, TrainConfig)


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
  yield
  print(f"\nfuzz cases tried: {TRIED} (total {sum(TRIED.values())})")


def test_k3_kl_matches_its_formula_is_nonnegative_and_clamps():
  from tsallis_jax.estimators import k3_kl
  d = np.array([-30.0, -3.0, -0.1, 0.0, 0.1, 3.0, 30.0], np.float32)
  kl = np.asarray(k3_kl(jnp.zeros_like(d), jnp.asarray(d)))
  clamped = np.clip(d, -20.0, 20.0)
  np.testing.assert_allclose(kl, np.exp(clamped.astype(np.float64)) - clamped - 1.0, rtol=1e-5)
  assert np.all(kl >= 0) and kl[3] == 0.0
