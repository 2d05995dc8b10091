"""Tests for the KV-cached rollout sampler (`tsallis_jax.sampler`, issue 5; spec §1.6-§1.7)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from tsallis_jax import sampler as sampler_lib
from tsallis_jax.model import ModelConfig, Transformer, make_attention_mask, make_positions
from tsallis_jax.sampler import SamplingConfig

PAD = 0


def _model(seed: int = 0, logit_scale: float = 4.0) -> Transformer:
  """The tiny preset with its (tied) embedding scaled up, so next-token distributions are peaked, not ~uniform."""
  model = Transformer(ModelConfig.tiny(), rngs=nnx.Rngs(seed))
  model.embed[...] = model.embed[...] * logit_scale
  return model


@pytest.fixture(scope="module")
def model():
  return _model()


def _prompts(rng: np.random.Generator, lengths, vocab: int = 128):
  return [rng.integers(2, vocab, size=n).tolist() for n in lengths]


@jax.jit
def _forward(graphdef, params, tokens_NxS, mask_NxS):
  logits_NxSxV, _ = nnx.merge(graphdef, params)(tokens_NxS, make_positions(mask_NxS), make_attention_mask(mask_NxS))
  return logits_NxSxV


def _teacher_forced_logits(model, rollout):
  """Uncached forward over prompt + completion; returns the logits that predict each completion slot."""
  tokens_NxS = jnp.concatenate([rollout.prompt_tokens_NxP, rollout.tokens_NxT], axis=1)
  mask_NxS = jnp.concatenate([rollout.prompt_mask_NxP, rollout.mask_NxT], axis=1)
  logits_NxSxV = _forward(*nnx.split(model), tokens_NxS, mask_NxS)
  P = rollout.prompt_tokens_NxP.shape[1]
  return logits_NxSxV[:, P - 1:-1]


def _generate(model, tokens_BxP, mask_BxP, key, config):
  graphdef, params = nnx.split(model)
  return sampler_lib.generate(graphdef, params, jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP), key, config)


# ------------------------------------------------------------------------------------------------ config and helpers


@pytest.mark.parametrize("kwargs, match", [
  (dict(temperature=-1.0), "temperature"),
  (dict(top_k=-2), "top_k"),
  (dict(top_p=0.0), "top_p"),
  (dict(num_samples=0), "num_samples"),
  (dict(stop_ids=[1]), "stop_ids"),
  (dict(close_tag_ids=(5,)), "rationale_budget"),
  (dict(rationale_budget=8), "close_tag_ids"),
  (dict(cache_dtype="int8"), "cache_dtype"),
])
def test_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**kwargs)


def test_generate_rejects_mismatched_prompts_and_out_of_vocabulary_tags(model):
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts([[5, 6, 7]], PAD, buckets=(4,))
  with pytest.raises(ValueError, match="same rank-2 shape"):
    _generate(model, tokens_BxP, mask_BxP[:, 1:], jax.random.key(0), SamplingConfig(max_new_tokens=2))
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    _generate(model, tokens_BxP, mask_BxP, jax.random.key(0), SamplingConfig(
      close_tag_ids=(500,), rationale_budget=2, answer_budget=2))


def test_pad_prompts_buckets_and_sides():
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts([[5, 6, 7], [8]], PAD, buckets=(2, 4, 8), side="left")
  np.testing.assert_array_equal(tokens_BxP, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask_BxP, tokens_BxP != 0)
  tokens_BxP, _ = sampler_lib.pad_prompts([[5, 6, 7], [8]], PAD, buckets=(2, 4, 8), side="right")
  np.testing.assert_array_equal(tokens_BxP, [[5, 6, 7, 0], [8, 0, 0, 0]])
  with pytest.raises(ValueError, match="largest bucket"):
    sampler_lib.pad_prompts([[1] * 9], PAD, buckets=(4, 8))
  with pytest.raises(ValueError, match="empty"):
    sampler_lib.pad_prompts([[1], []], PAD)


# ------------------------------------------------------------------------------------------------ token selection


def _filtered_probs(logits_V: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Reference filter in float64 numpy, written independently of the sampler: sort, cut, renormalise."""
  scaled = logits_V.astype(np.float64) / temperature
  order = np.argsort(-scaled, kind="stable")
  keep = np.zeros_like(scaled, dtype=bool)
  keep[order[:top_k] if top_k else order] = True
  probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
  probs /= probs.sum()
  if top_p < 1.0:
    sorted_probs = probs[order]
    kept = np.searchsorted(np.cumsum(sorted_probs), top_p) + 1  # smallest prefix with mass >= top_p
    keep_p = np.zeros_like(keep)
    keep_p[order[:kept]] = True
    probs = np.where(keep_p, probs, 0.0)
    probs /= probs.sum()
  return probs


def _chisquare_pvalue(counts_V, probs_V):
  """Goodness of fit of sampled counts to `probs_V`; 0 if a token outside its support was sampled."""
  support = probs_V > 0
  if counts_V[~support].sum():
    return 0.0
  expected = probs_V[support] * counts_V.sum()
  assert expected.min() >= 5, "too few samples for the chi-square approximation"
  return scipy.stats.chisquare(counts_V[support], expected).pvalue


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.8), (1.0, 8, 0.9)])
def test_sampled_distribution_matches_filtered_softmax(temperature, top_k, top_p):
  V, N = 12, 40_000
  logits_V = np.random.default_rng(1).normal(size=V).astype(np.float32) * 1.5
  config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  select = jax.jit(sampler_lib.sample_from_logits, static_argnames="config")
  token_N, logp_N, log_z_N = select(jax.random.key(0), jnp.broadcast_to(logits_V, (N, V)), config)
  token_N = np.asarray(token_N)
  counts_V = np.bincount(token_N, minlength=V)
  probs_V = _filtered_probs(logits_V, temperature, top_k, top_p)
  assert _chisquare_pvalue(counts_V, probs_V) > 1e-3
  # The same counts reject the distribution at a wrong temperature (the test has power).
  wrong_V = _filtered_probs(logits_V, temperature * 1.3, top_k, top_p)
  assert _chisquare_pvalue(counts_V, wrong_V) < 1e-3
  # Returned log-probs are those of the filtered distribution; log_z normalises the unfiltered tempered softmax.
  np.testing.assert_allclose(np.asarray(logp_N), np.log(probs_V[token_N]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(log_z_N), np.log(np.exp(logits_V.astype(np.float64) / temperature).sum()),
                             atol=1e-5)


def test_two_level_inverse_cdf_draws_the_same_tokens_as_the_flat_cdf():
  """Block-then-entry inversion picks the same index as one cumulative sum for (almost) every u: it is the same
  inverse CDF, up to rounding at the cell boundaries. Zero-weight (-inf) entries, a whole -inf block and a ragged
  last block included."""
  rng = np.random.default_rng(7)
  C, N = 22, 20_000
  logits_C = rng.normal(size=C).astype(np.float32) * 2.0
  logits_C[[0, 5, 8, 9, 10, 11, 21]] = -np.inf  # block size 4: entries 8..11 are one all -inf block
  u_N = jnp.asarray(rng.uniform(size=N).astype(np.float32))
  scaled_NxC = jnp.broadcast_to(jnp.asarray(logits_C), (N, C))
  flat_N, flat_log_z_N = sampler_lib.inverse_cdf_sample(u_N, scaled_NxC)
  block_N, block_log_z_N = sampler_lib.inverse_cdf_sample(u_N, scaled_NxC, block=4)
  flat_N, block_N = np.asarray(flat_N), np.asarray(block_N)
  assert np.isfinite(logits_C[block_N]).all()  # never a zero-weight entry
  assert (flat_N == block_N).mean() > 0.999
  np.testing.assert_allclose(block_log_z_N, flat_log_z_N, rtol=1e-6)
  probs_C = np.exp(logits_C.astype(np.float64) - logits_C[np.isfinite(logits_C)].max())
  probs_C /= probs_C.sum()
  assert _chisquare_pvalue(np.bincount(block_N, minlength=C), probs_C) > 1e-3


def test_sampled_distribution_over_a_large_vocabulary_uses_two_levels_and_fits():
  V, N = 1000, 100_000
  assert V > sampler_lib.FLAT_CDF_MAX  # the two-level path
  logits_V = np.random.default_rng(2).normal(size=V).astype(np.float32) * 0.5
  select = jax.jit(sampler_lib.sample_from_logits, static_argnames="config")
  token_N, logp_N, _ = select(jax.random.key(1), jnp.broadcast_to(logits_V, (N, V)), SamplingConfig(temperature=0.8))
  token_N = np.asarray(token_N)
  probs_V = _filtered_probs(logits_V, 0.8, 0, 1.0)
  counts_V = np.bincount(token_N, minlength=V)
  assert _chisquare_pvalue(counts_V, probs_V) > 1e-3
  assert _chisquare_pvalue(counts_V, _filtered_probs(logits_V, 0.8 * 1.3, 0, 1.0)) < 1e-3
  np.testing.assert_allclose(np.asarray(logp_N), np.log(probs_V[token_N]), atol=1e-5)


def test_greedy_selection_is_argmax_with_zero_logp():
  logits_NxV = jax.random.normal(jax.random.key(3), (16, 40))
  token_N, logp_N, _ = sampler_lib.sample_from_logits(jax.random.key(0), logits_NxV, SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(token_N, jnp.argmax(logits_NxV, axis=-1))
  np.testing.assert_array_equal(logp_N, 0.0)


# ------------------------------------------------------------------------------------------------ generate


def test_greedy_equals_uncached_argmax_and_padding_side_does_not_matter(model):
  prompts = _prompts(np.random.default_rng(0), [3, 7, 1, 5])
  config = SamplingConfig(num_samples=2, max_new_tokens=10, temperature=0.0)
  left_BxP, left_mask_BxP = sampler_lib.pad_prompts(prompts, PAD, buckets=(8,), side="left")
  right_BxP, right_mask_BxP = sampler_lib.pad_prompts(prompts, PAD, buckets=(8,), side="right")
  rollout = _generate(model, left_BxP, left_mask_BxP, jax.random.key(0), config)
  chex.assert_shape(rollout.tokens_NxT, (8, 10))
  chex.assert_trees_all_equal(rollout.tokens_NxT[0::2], rollout.tokens_NxT[1::2])  # greedy: G copies agree
  logits_NxTxV = _teacher_forced_logits(model, rollout)
  np.testing.assert_array_equal(rollout.tokens_NxT, jnp.argmax(logits_NxTxV, axis=-1))
  right = _generate(model, right_BxP, right_mask_BxP, jax.random.key(0), config)
  np.testing.assert_array_equal(right.tokens_NxT, rollout.tokens_NxT)
  np.testing.assert_array_equal(right.prompt_tokens_NxP, rollout.prompt_tokens_NxP)


def test_logps_equal_teacher_forced_logps(model):
  prompts = _prompts(np.random.default_rng(1), [4, 8, 2])
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(prompts, PAD, buckets=(8,), side="right")
  for config in (SamplingConfig(num_samples=3, max_new_tokens=12, temperature=0.7, stop_ids=(2, 3)),
                 SamplingConfig(num_samples=3, max_new_tokens=12, temperature=1.3, top_k=6)):
    rollout = _generate(model, tokens_BxP, mask_BxP, jax.random.key(4), config)
    chex.assert_tree_all_finite(rollout.logp_NxT)
    logits_NxTxV = _teacher_forced_logits(model, rollout) / config.temperature
    recomputed_NxT = jnp.take_along_axis(jax.nn.log_softmax(logits_NxTxV, axis=-1), rollout.tokens_NxT[..., None],
                                         axis=-1)[..., 0]
    recomputed_NxT = jnp.where(rollout.mask_NxT, recomputed_NxT, 0.0)
    np.testing.assert_allclose(rollout.model_logp_NxT, recomputed_NxT, atol=1e-4)
    if config.filtered:  # renormalised over the top k: at least the unfiltered log-prob
      assert bool(jnp.all(rollout.logp_NxT >= rollout.model_logp_NxT - 1e-5))
      assert bool(jnp.any(rollout.logp_NxT > rollout.model_logp_NxT + 1e-3))
    else:
      np.testing.assert_allclose(rollout.logp_NxT, rollout.model_logp_NxT, atol=1e-6)


def test_first_token_distribution_of_the_sampler():
  """The whole pipeline (prefill, cache repeat, first decode step) samples from the filtered model softmax."""
  model = _model(logit_scale=3.0)  # flatter than the fixture, so every kept token gets enough expected counts
  prompts = _prompts(np.random.default_rng(2), [6])
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(prompts, PAD, buckets=(8,))
  config = SamplingConfig(num_samples=6000, max_new_tokens=1, temperature=0.8, top_k=6)
  rollout = _generate(model, tokens_BxP, mask_BxP, jax.random.key(5), config)
  logits_V = np.asarray(_teacher_forced_logits(model, rollout)[0, 0])
  counts_V = np.bincount(np.asarray(rollout.tokens_NxT[:, 0]), minlength=logits_V.shape[0])
  probs_V = _filtered_probs(logits_V, 0.8, 6, 1.0)
  assert _chisquare_pvalue(counts_V, probs_V) > 1e-3
  assert _chisquare_pvalue(counts_V, _filtered_probs(logits_V, 1.2, 6, 1.0)) < 1e-3


def test_same_key_same_samples_and_group_samples_differ(model):
  prompts = _prompts(np.random.default_rng(3), [5, 2])
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(prompts, PAD, buckets=(8,))
  config = SamplingConfig(num_samples=4, max_new_tokens=8, temperature=1.0)
  a = _generate(model, tokens_BxP, mask_BxP, jax.random.key(7), config)
  b = _generate(model, tokens_BxP, mask_BxP, jax.random.key(7), config)
  c = _generate(model, tokens_BxP, mask_BxP, jax.random.key(8), config)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a.tokens_NxT, c.tokens_NxT)
  for g in range(1, 4):  # the 4 samples of prompt 0 (rows 0..3) are not copies of each other
    assert not np.array_equal(a.tokens_NxT[0], a.tokens_NxT[g])
  np.testing.assert_array_equal(a.prompt_tokens_NxP[:4], jnp.broadcast_to(a.prompt_tokens_NxP[0], (4, 8)))


def _spy_on_model_calls(monkeypatch) -> list:
  """Records the token shape of every `Transformer.hidden` call (prefill and decode steps) while tracing."""
  calls = []
  original = Transformer.hidden

  def spy(self, tokens_NxT, *args, **kwargs):
    calls.append(tokens_NxT.shape)
    return original(self, tokens_NxT, *args, **kwargs)

  monkeypatch.setattr(Transformer, "hidden", spy)
  return calls


def test_prefill_runs_once_per_prompt_not_per_sample(model, monkeypatch):
  calls = _spy_on_model_calls(monkeypatch)
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(4), [5, 3, 8]), PAD, buckets=(8,))
  config = SamplingConfig(num_samples=5, max_new_tokens=4, temperature=1.0)
  graphdef, params = nnx.split(model)
  jax.make_jaxpr(lambda p, t, m, k: sampler_lib.generate_impl(graphdef, p, t, m, k, config))(
    params, jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP), jax.random.key(0))
  assert calls == [(3, 8), (15, 1)]  # one prefill of the B prompts, then one token per row per decode step


def test_prompt_of_b_prefills_each_distinct_prompt_once_and_samples_as_unshared(model, monkeypatch):
  prompts = _prompts(np.random.default_rng(4), [5, 3, 8])
  requests = [prompts[i] for i in (0, 1, 0, 2, 1, 0)]
  config = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=1.0, stop_ids=(1,))
  graphdef, params = nnx.split(model)
  flat_BxP, flat_mask_BxP = sampler_lib.pad_prompts(requests, PAD, buckets=(8,))
  plain = _generate(model, flat_BxP, flat_mask_BxP, jax.random.key(3), config)
  rows, prompt_of_B = sampler_lib.unique_prompts(requests)
  assert len(rows) == 4 and rows[3] == rows[0]  # 3 distinct prompts, padded to a power of two
  np.testing.assert_array_equal(prompt_of_B, [0, 1, 0, 2, 1, 0])
  tokens_UxP, mask_UxP = sampler_lib.pad_prompts(rows, PAD, buckets=(8,))
  shared = sampler_lib.generate(graphdef, params, jnp.asarray(tokens_UxP), jnp.asarray(mask_UxP), jax.random.key(3),
                                config, jnp.asarray(prompt_of_B))
  chex.assert_trees_all_close(shared, plain, atol=1e-5)  # the same rollout, row for row
  np.testing.assert_array_equal(shared.tokens_NxT, plain.tokens_NxT)

  calls = _spy_on_model_calls(monkeypatch)
  jax.make_jaxpr(lambda p, t, m, k, r: sampler_lib.generate_impl(graphdef, p, t, m, k, config, r))(
    params, jnp.asarray(tokens_UxP), jnp.asarray(mask_UxP), jax.random.key(0), jnp.asarray(prompt_of_B))
  assert calls == [(4, 8), (12, 1)]  # the 4 prompt rows are prefilled, 6 requests x 2 samples decode


def test_text_sampler_shares_the_prefill_of_repeated_prompts(model):
  tokenizer = _word_tokenizer()
  config = SamplingConfig(num_samples=1, max_new_tokens=5, temperature=1.0, stop_ids=(1,), pad_id=0)
  shared = sampler_lib.Sampler(model, tokenizer, config, prompt_buckets=(8,))
  unshared = sampler_lib.Sampler(model, tokenizer, config, prompt_buckets=(8,), share_prefill=False)
  batch = ["t5 t6 t7", "t9 t10", "t5 t6 t7", "t5 t6 t7", "t9 t10", "t11"]
  a, b = shared(batch, jax.random.key(2)), unshared(batch, jax.random.key(2))
  assert a.completions == b.completions
  np.testing.assert_array_equal(a.rollout.prompt_tokens_NxP, b.rollout.prompt_tokens_NxP)
  compiled = sampler_lib.generate._cache_size()
  shared(["t2", "t3", "t2", "t2", "t3", "t4"], jax.random.key(0))  # 3 distinct -> 4 rows: the same compiled shape
  assert sampler_lib.generate._cache_size() == compiled
  shared(["t2", "t3", "t4", "t2"], jax.random.key(0))  # 4 padded rows save nothing over 4 requests: plain path
  plain = sampler_lib.generate._cache_size()
  shared(["t2", "t3", "t4", "t5"], jax.random.key(0))  # nothing repeats: plain path, the same shape
  assert sampler_lib.generate._cache_size() == plain


def test_stop_tokens_end_sequences_and_mask_the_rest(model):
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(5), [4, 6, 2, 7]), PAD, buckets=(8,))
  stop_ids = tuple(range(2, 40))  # about a third of the vocabulary: every row stops within a few tokens
  config = SamplingConfig(num_samples=4, max_new_tokens=64, temperature=1.0, stop_ids=stop_ids, pad_id=PAD)
  rollout = _generate(model, tokens_BxP, mask_BxP, jax.random.key(9), config)
  tokens_NxT = np.asarray(rollout.tokens_NxT)
  is_stop_NxT = np.isin(tokens_NxT, stop_ids)
  assert is_stop_NxT.any(axis=1).all()
  first_stop_N = is_stop_NxT.argmax(axis=1)
  np.testing.assert_array_equal(rollout.lengths_N, first_stop_N + 1)
  slots_T = np.arange(64)
  np.testing.assert_array_equal(rollout.mask_NxT, slots_T[None] <= first_stop_N[:, None])
  assert (tokens_NxT[~np.asarray(rollout.mask_NxT)] == PAD).all()
  assert (np.asarray(rollout.logp_NxT)[~np.asarray(rollout.mask_NxT)] == 0).all()
  assert not np.asarray(rollout.truncated_N).any()
  assert int(rollout.num_steps) == int(first_stop_N.max()) + 1 < 64  # the loop stopped early
  np.testing.assert_array_equal(rollout.answer_mask_NxT, rollout.mask_NxT)  # no budget forcing: all answer
  truncated = _generate(model, tokens_BxP, mask_BxP, jax.random.key(9), SamplingConfig(
    num_samples=4, max_new_tokens=6, temperature=1.0, stop_ids=(1,)))
  stopped_N = np.isin(np.asarray(truncated.tokens_NxT), (1,)).any(axis=1)
  assert (~stopped_N).any()
  np.testing.assert_array_equal(truncated.truncated_N, ~stopped_N)
  assert (np.asarray(truncated.lengths_N)[~stopped_N] == 6).all()


def test_budget_forcing_inserts_the_tag_at_the_budget(model):
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(6), [4, 6]), PAD, buckets=(8,))
  tag = (1, 0)  # a pair this model does not sample in the first 5 steps with this key (so every row is forced)
  budget, answer = 5, 4
  config = SamplingConfig(num_samples=3, temperature=1.0, close_tag_ids=tag, rationale_budget=budget,
                          answer_budget=answer)
  rollout = _generate(model, tokens_BxP, mask_BxP, jax.random.key(11), config)
  chex.assert_shape(rollout.tokens_NxT, (6, budget + len(tag) + answer))
  tokens_NxT = np.asarray(rollout.tokens_NxT)
  forced_N = np.asarray(rollout.forced_N)
  assert forced_N.all()
  np.testing.assert_array_equal(tokens_NxT[:, budget:budget + 2], np.broadcast_to(tag, (6, 2)))
  expected_forced_NxT = np.zeros(tokens_NxT.shape, bool)
  expected_forced_NxT[:, budget:budget + 2] = True
  np.testing.assert_array_equal(rollout.forced_mask_NxT, expected_forced_NxT)
  assert (np.asarray(rollout.logp_NxT)[expected_forced_NxT] == 0).all()
  assert (np.asarray(rollout.model_logp_NxT)[expected_forced_NxT] < 0).all()  # the model's own log-prob of the tag
  np.testing.assert_array_equal(rollout.answer_start_N, budget + 2)
  mask_NxT = np.asarray(rollout.mask_NxT)
  np.testing.assert_array_equal(np.asarray(rollout.rationale_mask_NxT), mask_NxT & (np.arange(11) < budget + 2))
  np.testing.assert_array_equal(np.asarray(rollout.answer_mask_NxT), mask_NxT & (np.arange(11) >= budget + 2))
  np.testing.assert_array_equal(rollout.lengths_N, budget + 2 + answer)  # the answer budget ends every row
  assert np.asarray(rollout.truncated_N).all() and np.asarray(rollout.closed_N).all()


def test_budget_forcing_lets_the_model_close_the_rationale_itself(model):
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(7), [5]), PAD, buckets=(8,))
  greedy = _generate(model, tokens_BxP, mask_BxP, jax.random.key(0),
                     SamplingConfig(max_new_tokens=8, temperature=0.0))
  row = np.asarray(greedy.tokens_NxT[0]).tolist()
  tag = (row[1], row[2])  # the model emits this pair at steps 1-2 (or earlier if it occurs at 0-1)
  closes_at = next(i for i in range(1, 8) if (row[i - 1], row[i]) == tag) + 1
  budget, answer = 6, 3
  rollout = _generate(model, tokens_BxP, mask_BxP, jax.random.key(0), SamplingConfig(
    temperature=0.0, close_tag_ids=tag, rationale_budget=budget, answer_budget=answer))
  assert not bool(rollout.forced_N[0]) and bool(rollout.closed_N[0])
  assert int(rollout.answer_start_N[0]) == closes_at
  assert int(rollout.lengths_N[0]) == closes_at + answer
  np.testing.assert_array_equal(rollout.tokens_NxT[0, :closes_at + answer], row[:closes_at + answer])
  assert (np.asarray(rollout.tokens_NxT[0, closes_at + answer:]) == PAD).all()
  assert not np.asarray(rollout.forced_mask_NxT).any()


def test_sharded_params_and_data_sharded_batch_on_eight_devices(model):
  """Params sharded by the model's logical-axis rules over `fsdp`, prompts over `data`: same samples as 1 device."""
  assert jax.device_count() == 8
  from tsallis_jax import distributed
  from tsallis_jax.model import param_shardings
  mesh = distributed.make_mesh({"data": 4, "fsdp": 2})
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(8), [3, 5, 8, 1, 2, 6, 7, 4]), PAD,
                                                 buckets=(8,))
  config = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=1.0, top_p=0.9)
  expected = _generate(model, tokens_BxP, mask_BxP, jax.random.key(2), config)
  graphdef, params = nnx.split(model)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh):
    params = jax.device_put(params, param_shardings(params, mesh, model.config.sharding_rules))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
    rollout = sampler_lib.generate(graphdef, params, jax.device_put(jnp.asarray(tokens_BxP), batch_sharding),
                                   jax.device_put(jnp.asarray(mask_BxP), batch_sharding), jax.random.key(2), config)
  assert not rollout.tokens_NxT.sharding.is_fully_replicated
  np.testing.assert_array_equal(rollout.tokens_NxT, expected.tokens_NxT)
  np.testing.assert_allclose(rollout.logp_NxT, expected.logp_NxT, atol=1e-5)


# ------------------------------------------------------------------------------------------------ text level


def _word_tokenizer(vocab: int = 128):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
  backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens(["<pad>", "<eos>"])
  return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def test_text_sampler_round_trip_and_one_compile_per_bucket(model):
  tokenizer = _word_tokenizer()
  config = SamplingConfig(num_samples=2, max_new_tokens=5, temperature=1.0, stop_ids=(1,), pad_id=0)
  sampler = sampler_lib.Sampler(model, tokenizer, config, prompt_buckets=(8, 16))
  out = sampler(["t5 t6 t7", "t9 t10 t11 t12 t13"], jax.random.key(0))
  assert [len(c) for c in out.completions] == [2, 2]
  for n, text in enumerate(sum(out.completions, [])):
    ids = np.asarray(out.rollout.tokens_NxT[n, :int(out.rollout.lengths_N[n])])
    assert text.split() == [f"t{i}" for i in ids if i > 1]
  np.testing.assert_array_equal(out.rollout.prompt_tokens_NxP[0, -3:], [5, 6, 7])
  compiled = sampler_lib.generate._cache_size()  # the one jitted entry point
  sampler(["t3", "t4 t5 t6 t7 t8 t9 t10"], jax.random.key(1))  # another length in the same bucket
  assert sampler_lib.generate._cache_size() == compiled
  sampler(["t3 " * 12], jax.random.key(1))  # the next bucket
  assert sampler_lib.generate._cache_size() == compiled + 1


def test_text_sampler_applies_the_chat_template(model):
  tokenizer = _word_tokenizer()
  tokenizer.chat_template = ("{% for m in messages %}t2 {{ m['content'] }} t3 {% endfor %}"
                             "{% if add_generation_prompt %}t4{% endif %}")
  sampler = sampler_lib.Sampler(model, tokenizer, SamplingConfig(max_new_tokens=2), chat_template=True)
  assert sampler.encode(["t9 t10"]) == [[2, 9, 10, 3, 4]]
  with pytest.raises(ValueError, match="list of prompt strings"):
    sampler("t9 t10", jax.random.key(0))


# ------------------------------------------------------------------------------------------------ transformers parity


@pytest.mark.torch
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_equals_transformers_generate(family, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tsallis_jax.model import hf_io
  sizes = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=10_000.0,
               initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None)
  if family == "qwen3":
    hf_config = transformers.Qwen3Config(tie_word_embeddings=True, **sizes)
    hf_model = transformers.Qwen3ForCausalLM(hf_config)
  else:
    hf_config = transformers.LlamaConfig(tie_word_embeddings=False, **sizes)
    hf_model = transformers.LlamaForCausalLM(hf_config)
  torch.manual_seed(0)
  hf_model.apply(hf_model._init_weights)
  hf_model.eval().save_pretrained(tmp_path)
  model = hf_io.load_hf_checkpoint(tmp_path)

  prompts = _prompts(np.random.default_rng(10), [5, 8, 3], vocab=96)
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(prompts, PAD, buckets=(8,), side="left")
  new = 8
  rollout = _generate(model, tokens_BxP, mask_BxP, jax.random.key(0),
                      SamplingConfig(max_new_tokens=new, temperature=0.0))
  with torch.no_grad():
    expected = hf_model.generate(torch.tensor(tokens_BxP, dtype=torch.long),
                                 attention_mask=torch.tensor(mask_BxP, dtype=torch.long), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=PAD)
  np.testing.assert_array_equal(np.asarray(rollout.tokens_NxT), expected[:, tokens_BxP.shape[1]:].numpy())


# ------------------------------------------------------------------------------------------------ saved reference


def test_samples_equal_the_saved_reference_bit_for_bit():
  """Fixed-key rollouts of the tiny model equal those saved from the sampler before its split into stages
  (`tests/fixtures/sampler_reference.py`): every field, tokens and log-probs, bit for bit."""
  from tests.fixtures import sampler_reference
  saved = np.load(sampler_reference.PATH)
  for name, fields in sampler_reference.rollouts().items():
    for field, value in fields.items():
      np.testing.assert_array_equal(value, saved[f"{name}/{field}"], err_msg=f"{name}/{field}")
  # Layers under scan (`scan_layers=True`) compute the same function up to float32 rounding: the same tokens and masks,
  # log-probs within a few ulp. The cases that differ in how the stacked cache is filled and read (one row per
  # request, budget forcing, requests sharing a prefilled row); the token-selection cases (filtered, greedy, a large
  # vocabulary) do not touch the layers' form, and each costs a compile.
  scan_cases = ("plain", "forced", "shared_prefill")
  scanned = sampler_reference.rollouts(scan_layers=True, names=scan_cases)
  assert tuple(scanned) == scan_cases
  for name, fields in scanned.items():
    for field, value in fields.items():
      if np.issubdtype(value.dtype, np.floating):
        np.testing.assert_allclose(value, saved[f"{name}/{field}"], rtol=1e-5, atol=1e-5, err_msg=f"{name}/{field}")
      else:
        np.testing.assert_array_equal(value, saved[f"{name}/{field}"], err_msg=f"{name}/{field}")


# ------------------------------------------------------------------------------------------------ memory knobs


def _rollouts_equal(got, want):
  for name in ("tokens_NxT", "mask_NxT", "forced_mask_NxT", "answer_mask_NxT", "lengths_N", "answer_start_N",
               "closed_N", "prompt_tokens_NxP", "num_steps"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  np.testing.assert_allclose(got.logp_NxT, want.logp_NxT, atol=1e-5)
  np.testing.assert_allclose(got.model_logp_NxT, want.model_logp_NxT, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [2, 4, 8])
def test_chunked_rows_give_the_unchunked_samples(model, chunk_rows):
  """chunk_rows bounds the KV cache to that many rows; the samples (budget forcing and early stops included) are the
  ones of one pass over all N = 4*2 rows for the same key."""
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(3), [3, 5, 1, 6]), PAD, buckets=(8,))
  config = SamplingConfig(num_samples=2, temperature=1.0, stop_ids=(1, 7), close_tag_ids=(9, 10),
                          rationale_budget=5, answer_budget=3)
  want = _generate(model, tokens_BxP, mask_BxP, jax.random.key(4), config)
  got = _generate(model, tokens_BxP, mask_BxP, jax.random.key(4), SamplingConfig(
    **{**config.__dict__, "chunk_rows": chunk_rows}))
  chex.assert_trees_all_equal_shapes(got, want)
  _rollouts_equal(got, want)


def test_chunked_rows_with_shared_prompts(model):
  """`prompt_of_B` (requests sharing prompt rows) under chunking: the same samples as without chunks."""
  tokens_UxP, mask_UxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(5), [4, 2]), PAD, buckets=(4,))
  prompt_of_B = jnp.asarray([1, 0, 1, 1], jnp.int32)
  graphdef, params = nnx.split(model)
  config = SamplingConfig(num_samples=3, max_new_tokens=5, temperature=0.7, top_k=20)
  run = lambda c: sampler_lib.generate(graphdef, params, jnp.asarray(tokens_UxP), jnp.asarray(mask_UxP),
                                       jax.random.key(6), c, prompt_of_B)
  _rollouts_equal(run(SamplingConfig(**{**config.__dict__, "chunk_rows": 6})), run(config))


def test_chunk_rows_must_hold_whole_prompts_and_divide_the_rows(model):
  with pytest.raises(ValueError, match="chunk_rows=3 is not a multiple of num_samples=2"):
    SamplingConfig(num_samples=2, chunk_rows=3)
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts([[5, 6], [7], [8]], PAD, buckets=(4,))
  with pytest.raises(ValueError, match="does not divide the N = B\\*G = 3\\*2 = 6 rows"):
    _generate(model, tokens_BxP, mask_BxP, jax.random.key(0), SamplingConfig(num_samples=2, max_new_tokens=2,
                                                                              chunk_rows=4))


def test_chunked_rows_on_eight_devices(model):
  """Rows sharded over `data`: every chunk is spread over all data shards (request b = w*Z + z goes to chunk z), the
  output keeps the rows' sharding, and the samples equal one device's unchunked ones."""
  from tsallis_jax import distributed
  mesh = distributed.make_mesh({"data": 8, "fsdp": 1})
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(
    _prompts(np.random.default_rng(9), [3, 5, 8, 1, 2, 6, 7, 4] * 2), PAD, buckets=(8,))
  config = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=1.0, stop_ids=(1,))
  want = _generate(model, tokens_BxP, mask_BxP, jax.random.key(2), config)
  graphdef, params = nnx.split(model)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  chunked = SamplingConfig(**{**config.__dict__, "chunk_rows": 16})  # Z = 2 chunks of W = 8 prompts, one per device
  with jax.set_mesh(mesh):
    got = sampler_lib.generate(graphdef, params, jax.device_put(jnp.asarray(tokens_BxP), rows),
                               jax.device_put(jnp.asarray(mask_BxP), rows), jax.random.key(2), chunked)
  assert got.tokens_NxT.sharding.spec[0] == "data"
  _rollouts_equal(got, want)


def test_bfloat16_cache_agrees_with_float32(model):
  """A bfloat16 KV cache rounds keys and values to 8 mantissa bits. Each cache's log-probs match the uncached
  float32 forward over its own tokens: to 1e-4 with a float32 cache, to 0.05 nats with a bfloat16 one (relative
  precision 2^-8 on logits of a few units on the scaled-up tiny model). Greedy decodes agree on at least 90% of
  tokens: a near-tie can flip one token and the rest of its row with it, so exact equality is not asserted."""
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(11), [3, 5, 8, 2, 6, 7]), PAD,
                                                 buckets=(8,))
  greedy = SamplingConfig(num_samples=1, max_new_tokens=12, temperature=0.0, cache_dtype="float32")
  f32 = _generate(model, tokens_BxP, mask_BxP, jax.random.key(0), greedy)
  b16 = _generate(model, tokens_BxP, mask_BxP, jax.random.key(0),
                  SamplingConfig(**{**greedy.__dict__, "cache_dtype": "bfloat16"}))
  assert float(jnp.mean((f32.tokens_NxT == b16.tokens_NxT).astype(jnp.float32))) >= 0.9
  for rollout, atol in ((f32, 1e-4), (b16, 5e-2)):
    logits_NxTxV = _teacher_forced_logits(model, rollout)
    ref_NxT = jnp.take_along_axis(jax.nn.log_softmax(logits_NxTxV, axis=-1), rollout.tokens_NxT[..., None],
                                  axis=-1)[..., 0]
    np.testing.assert_allclose(np.where(rollout.mask_NxT, rollout.model_logp_NxT, 0.0),
                               np.where(rollout.mask_NxT, ref_NxT, 0.0), atol=atol)


def test_chunked_rows_with_layers_under_scan():
  """The paper configs combine chunked rows with layers under scan (a stacked LxNxKxSxE cache, expanded and chunked
  on its batch axis 1): the same samples as one pass of the scanned model, and as the unrolled model's."""
  unrolled = _model()
  scanned = Transformer(ModelConfig.tiny(scan_layers=True), rngs=nnx.Rngs(0))
  scanned.embed[...] = scanned.embed[...] * 4.0
  tokens_BxP, mask_BxP = sampler_lib.pad_prompts(_prompts(np.random.default_rng(3), [3, 5, 1, 6]), PAD, buckets=(8,))
  config = SamplingConfig(num_samples=2, temperature=1.0, stop_ids=(1, 7), close_tag_ids=(9, 10),
                          rationale_budget=5, answer_budget=3)
  want = _generate(scanned, tokens_BxP, mask_BxP, jax.random.key(4), config)
  got = _generate(scanned, tokens_BxP, mask_BxP, jax.random.key(4), SamplingConfig(
    **{**config.__dict__, "chunk_rows": 4}))
  _rollouts_equal(got, want)
  _rollouts_equal(want, _generate(unrolled, tokens_BxP, mask_BxP, jax.random.key(4), config))
