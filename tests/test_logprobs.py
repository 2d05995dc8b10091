"""Per-token and per-segment log-probs (spec §1.6: log p(z|x) and w = p(y*|x, z) from one forward pass)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from tsallis_jax.model import (ModelConfig, Transformer, make_attention_mask, make_positions, segment_logprob,
                               sequence_logprobs, token_logprobs)


def test_token_logprobs_match_a_direct_log_softmax_loop():
  rng = np.random.default_rng(0)
  logits_NxTxV = rng.normal(size=(3, 5, 7)).astype(np.float32) * 4
  tokens_NxT = rng.integers(0, 7, size=(3, 5))
  for temperature in (1.0, 0.7):
    got_NxT = np.asarray(token_logprobs(jnp.asarray(logits_NxTxV), jnp.asarray(tokens_NxT), temperature=temperature))
    for n in range(3):
      assert got_NxT[n, 0] == 0.0
      for t in range(1, 5):
        want = log_softmax(logits_NxTxV[n, t - 1].astype(np.float64) / temperature)[tokens_NxT[n, t]]
        np.testing.assert_allclose(got_NxT[n, t], want, rtol=1e-5, atol=1e-5)
  # bfloat16 logits are scored in float32.
  assert token_logprobs(jnp.asarray(logits_NxTxV, jnp.bfloat16), jnp.asarray(tokens_NxT)).dtype == jnp.float32


def test_segment_logprob_is_the_masked_sum():
  rng = np.random.default_rng(1)
  logp_NxT = -rng.exponential(size=(4, 6)).astype(np.float32)
  mask_NxT = rng.random((4, 6)) < 0.5
  want_N = np.array([sum(logp_NxT[n, t] for t in range(6) if mask_NxT[n, t]) for n in range(4)])
  np.testing.assert_allclose(segment_logprob(jnp.asarray(logp_NxT), jnp.asarray(mask_NxT)), want_N, rtol=1e-6)
  with pytest.raises(ValueError, match="mask shape"):
    segment_logprob(jnp.asarray(logp_NxT), jnp.asarray(mask_NxT[:, :5]))


def _batch():
  """Two left-padded [prompt, rationale, answer] rows and their segment masks."""
  tokens_NxT = np.array([[0, 0, 3, 4, 5, 6, 7, 8, 9, 10], [0, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
  pad_NxT = tokens_NxT != 0
  rationale_NxT = np.zeros_like(pad_NxT)
  answer_NxT = np.zeros_like(pad_NxT)
  rationale_NxT[0, 4:8], answer_NxT[0, 8:] = True, True   # prompt 3 4, rationale 5 6 7 8, answer 9 10
  rationale_NxT[1, 4:7], answer_NxT[1, 7:] = True, True   # prompt 11 12 13, rationale 14 15 16, answer 17 18 19
  return tokens_NxT, pad_NxT, rationale_NxT, answer_NxT


def test_sequence_logprobs_match_prefix_by_prefix_forwards_and_gradients_flow():
  cfg = ModelConfig.tiny(num_layers=1)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  tokens_NxT, pad_NxT, rationale_NxT, answer_NxT = _batch()
  segments = {"rationale": jnp.asarray(rationale_NxT), "answer": jnp.asarray(answer_NxT)}
  graphdef, params = nnx.split(model)

  def logprobs(params):
    return sequence_logprobs(nnx.merge(graphdef, params), jnp.asarray(tokens_NxT), jnp.asarray(pad_NxT), segments)

  @jax.jit
  def logprobs_and_segment_grads(params):
    grads = {name: jax.grad(lambda p, name=name: jnp.sum(logprobs(p)[0][name]))(params) for name in segments}
    return logprobs(params), grads

  (sums, logp_NxT), segment_grads = logprobs_and_segment_grads(params)

  # Direct computation: for each scored token, a separate forward over its prefix alone, without left padding
  # (right-filled to one length so it compiles once; the filler comes after the prefix and is masked out).
  @jax.jit
  def next_token_logp(params, prefix_1xT, prefix_len):
    m = nnx.merge(graphdef, params)
    real_1xT = jnp.arange(prefix_1xT.shape[1])[None, :] < prefix_len
    logits = m(prefix_1xT, make_positions(real_1xT), make_attention_mask(real_1xT))[0]
    return jax.nn.log_softmax(logits[0, prefix_len - 1])

  for n in range(2):
    want = {"rationale": 0.0, "answer": 0.0}
    real = tokens_NxT[n][pad_NxT[n]]
    offset = int((~pad_NxT[n]).sum())
    for t in range(1, len(real)):
      prefix_1xT = np.zeros((1, tokens_NxT.shape[1]), np.int64)
      prefix_1xT[0, :t] = real[:t]
      logp = float(next_token_logp(params, jnp.asarray(prefix_1xT), t)[real[t]])
      np.testing.assert_allclose(logp_NxT[n, offset + t], logp, atol=2e-5)
      for name, mask in (("rationale", rationale_NxT), ("answer", answer_NxT)):
        if mask[n, offset + t]:
          want[name] += logp
    for name in want:
      np.testing.assert_allclose(sums[name][n], want[name], atol=1e-4)

  # Gradients reach the parameters through both segments (the paper's score-function and pathwise terms).
  for name, grads in segment_grads.items():
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    assert float(jnp.linalg.norm(grads["layers"][0]["mlp"]["up_proj"][...])) > 0


def test_chunked_logprobs_from_hidden_match_full_logits_and_their_gradients():
  model = Transformer(ModelConfig.tiny(num_layers=1, tie_embeddings=False), rngs=nnx.Rngs(4))
  tokens_NxT, pad_NxT, rationale_NxT, answer_NxT = _batch()
  segments = {"rationale": jnp.asarray(rationale_NxT), "answer": jnp.asarray(answer_NxT)}
  graphdef, params = nnx.split(model)

  @jax.jit
  def both(params):
    m = nnx.merge(graphdef, params)
    full = sequence_logprobs(m, jnp.asarray(tokens_NxT), jnp.asarray(pad_NxT), segments, temperature=0.8)
    chunked = sequence_logprobs(m, jnp.asarray(tokens_NxT), jnp.asarray(pad_NxT), segments, temperature=0.8,
                                chunk_size=4)  # 9 scored positions: 3 chunks, the last one padded
    return full, chunked

  (full_sums, full_logp), (chunk_sums, chunk_logp) = both(params)
  np.testing.assert_allclose(chunk_logp, full_logp, atol=1e-5)
  grad_full = jax.jit(jax.grad(lambda p: both(p)[0][0]["answer"].sum()))(params)
  grad_chunk = jax.jit(jax.grad(lambda p: both(p)[1][0]["answer"].sum()))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad_chunk, grad_full)
