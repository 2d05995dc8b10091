"""Each prompt's forward pass once for its G samples (`model.shared_prompt`, `TrainConfig.share_prompt_forward`).

The hidden states and the gradient must equal one forward pass over every full sequence: left-padded prompts of
different lengths, completions that end early (pads after them), both layer layouts and remat. The train step must
give the same update and metrics with it on and off, on one device and on 8 (data x fsdp), and the compiled step
must really run fewer FLOPs (a sharing that silently ran the full sequences would pass the equality tests).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_scan import _random_params
from tests.test_train_microbatch import _one_step
from tests.test_train_step import BASE
from tsallis_jax import distributed
from tsallis_jax.model import ModelConfig, PromptGroupMask, Transformer, make_attention_mask, make_positions
from tsallis_jax.model.shared_prompt import completion_hidden

B, G, P, T = 2, 3, 5, 4


def _sequences(seed: int = 0):
  """B left-padded prompts (lengths 5 and 3) and G completions of each (one stops after 1 token, one after 3)."""
  rng = np.random.default_rng(seed)
  prompt_BxP = rng.integers(3, 60, (B, P)).astype(np.int32)
  prompt_mask_BxP = np.ones((B, P), bool)
  prompt_mask_BxP[1, :2] = False
  prompt_BxP[~prompt_mask_BxP] = 0
  comp_NxT = rng.integers(3, 60, (B * G, T)).astype(np.int32)
  comp_mask_NxT = np.ones((B * G, T), bool)
  comp_mask_NxT[1, 1:] = False
  comp_mask_NxT[4, 3:] = False
  comp_NxT[~comp_mask_NxT] = 0
  return prompt_BxP, prompt_mask_BxP, comp_NxT, comp_mask_NxT


def _full_hidden(model, prompt_BxP, prompt_mask_BxP, comp_NxT, comp_mask_NxT):
  """The reference: one forward over every full sequence [prompt b, completion b*G + g], positions P-1 on."""
  p, g = prompt_BxP.shape[1], comp_NxT.shape[0] // prompt_BxP.shape[0]
  tokens_NxS = jnp.concatenate([jnp.repeat(prompt_BxP, g, 0), comp_NxT], 1)
  pad_NxS = jnp.concatenate([jnp.repeat(prompt_mask_BxP, g, 0), comp_mask_NxT], 1)
  hidden_NxSxD, _ = model.hidden(tokens_NxS, make_positions(pad_NxS), make_attention_mask(pad_NxS))
  return hidden_NxSxD[:, p - 1:]


def _model(**overrides):
  return _random_params(Transformer(ModelConfig.tiny(num_layers=2, **overrides), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("overrides", [{}, {"remat": "full"}, {"scan_layers": True, "remat": "dots_saveable"},
                                       {"attention_query_chunk": 2}])
def test_completion_hidden_equals_the_full_forward_and_its_gradient(overrides):
  model = _model(**overrides)
  seqs = _sequences()
  shared = completion_hidden(model, *map(jnp.asarray, seqs))
  full = _full_hidden(model, *seqs)
  assert shared.shape == (B * G, T + 1, model.config.embed_dim)
  real_NxT1 = np.concatenate([np.ones((B * G, 1), bool), seqs[3]], 1)  # position P-1 and the real completion tokens
  np.testing.assert_allclose(np.asarray(shared)[real_NxT1], np.asarray(full)[real_NxT1], rtol=2e-5, atol=2e-5)

  graphdef, params = nnx.split(model)
  probe_NxTxD = jax.random.normal(jax.random.key(1), shared.shape)
  weight = jnp.asarray(real_NxT1, jnp.float32)[:, :, None]

  def loss(params, fn):
    return jnp.sum(jnp.tanh(fn(nnx.merge(graphdef, params), *seqs)) * probe_NxTxD * weight)
  g_shared = jax.grad(loss)(params, lambda m, *s: completion_hidden(m, *map(jnp.asarray, s)))
  g_full = jax.grad(loss)(params, _full_hidden)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_shared, g_full)
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_shared)) > 1e-3


def test_completion_hidden_needs_whole_groups():
  model = _model()
  prompt_BxP, prompt_mask_BxP, comp_NxT, comp_mask_NxT = map(jnp.asarray, _sequences())
  with pytest.raises(ValueError, match="rows b\\*G \\+ g must continue prompt b"):
    completion_hidden(model, prompt_BxP, prompt_mask_BxP, comp_NxT[:5], comp_mask_NxT[:5])
  with pytest.raises(ValueError, match="differ in shape"):
    completion_hidden(model, prompt_BxP, prompt_mask_BxP[:, 1:], comp_NxT, comp_mask_NxT)


def test_a_prompt_group_mask_of_the_wrong_shape_is_refused():
  model = _model()
  mask = PromptGroupMask(prompt_BxPxP=jnp.ones((B, P, P), bool), comp_NxTxS=jnp.ones((B * G, T, P + T), bool))
  tokens_BxL = jnp.zeros((B, P + G * T), jnp.int32)
  model.hidden(tokens_BxL, tokens_BxL, mask)  # the right shapes run
  with pytest.raises(ValueError, match=r"needs tokens of shape \(B, P \+ G\*T\) = \(2, 17\)"):
    model.hidden(tokens_BxL[:, 1:], tokens_BxL[:, 1:], mask)
  bad = PromptGroupMask(prompt_BxPxP=mask.prompt_BxPxP, comp_NxTxS=mask.comp_NxTxS[:, :, 1:])
  with pytest.raises(ValueError, match=r"B\*G x T x P\+T"):
    model.hidden(tokens_BxL, tokens_BxL, bad)


def test_each_projection_is_one_product_over_the_packed_rows():
  """The packed pass multiplies every weight once per layer, as one pass over the full sequences does (only the
  attention's score and value products come twice: prompt and completions); a prompt pass followed by a completion
  pass (the first design) multiplied every weight twice, in shorter products."""
  model = _model()
  seqs = tuple(map(jnp.asarray, _sequences()))
  dots = lambda fn: jax.jit(lambda *s: fn(model, *s)).lower(*seqs).as_text().count("stablehlo.dot_general")  # noqa: E731
  layers = model.config.num_layers
  assert dots(completion_hidden) == dots(_full_hidden) + 2 * layers, (dots(completion_hidden), dots(_full_hidden))


def test_the_shared_forward_runs_fewer_flops():
  """XLA's own count for the compiled forward + backward: B*P + N*T token positions instead of N*(P+T)."""
  model = _model()
  graphdef, params = nnx.split(model)
  seqs = tuple(map(jnp.asarray, _sequences()))

  def compiled_flops(fn):
    loss = lambda p: jnp.sum(fn(nnx.merge(graphdef, p), *seqs))  # noqa: E731
    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  shared, full = compiled_flops(completion_hidden), compiled_flops(_full_hidden)
  positions = (B * P + B * G * T) / (B * G * (P + T))  # 26 / 54
  assert shared < 0.75 * full, (shared, full)
  assert shared > 0.8 * positions * full, (shared, full)


# GRPO scores the sampled sequences, GARL with likelihood weights the teacher-forced ones (spliced gold answers).
@pytest.mark.parametrize("estimator, devices", [("grpo", 1), ("garl", 8)])
def test_the_train_step_is_the_same_with_and_without_prompt_sharing(estimator, devices):
  mesh = (distributed.make_mesh({"data": 4, "fsdp": 2}) if devices == 8
          else distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1]))
  cfg = BASE.replace(estimator=estimator, optimizer="sgd", learning_rate=1.0)
  assert cfg.share_prompt_forward  # the default
  params_on, metrics_on, tokens_on = _one_step(cfg, mesh)
  params_off, metrics_off, tokens_off = _one_step(cfg.replace(share_prompt_forward=False), mesh)
  np.testing.assert_array_equal(tokens_on, tokens_off)
  assert sorted(metrics_on) == sorted(metrics_off)
  for k in metrics_on:
    np.testing.assert_allclose(metrics_on[k], metrics_off[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_on, params_off)
  assert metrics_on["grad_norm"] > 0


def test_under_scan_the_shared_backward_needs_no_more_memory_than_the_full_one():
  """The prompt's keys and values are repeated inside each layer: a carried cache (every layer's copy kept for the
  backward) or a repeat of all layers at once made the paper config's train step 1558 and 83 GiB instead of 63
  (`paper_finqa_1gpu`'s record). XLA's temporaries of the gradient, 6 layers under scan with remat, G = 8."""
  model = _random_params(Transformer(ModelConfig.tiny(num_layers=6, scan_layers=True, remat="full"),
                                     rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  b, g, p, t = 2, 8, 48, 16
  seqs = (jnp.asarray(rng.integers(3, 60, (b, p)), jnp.int32), jnp.ones((b, p), bool),
          jnp.asarray(rng.integers(3, 60, (b * g, t)), jnp.int32), jnp.ones((b * g, t), bool))


  def temp_bytes(fn):
    loss = lambda q: jnp.sum(jnp.tanh(fn(nnx.merge(graphdef, q), *seqs)))  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  shared, whole = temp_bytes(completion_hidden), temp_bytes(_full_hidden)
  assert shared < whole, (shared, whole)


def test_teacher_forced_scores_with_each_prompt_once_per_group_equal_the_full_rows():
  """The scorer of `success.make_scorer` and `rationale_scores` (GARL / PAFT with likelihood weights): log p(z|x) and
  log w = log p(y*|x, z) of G sampled rationales per prompt, the gold answer spliced after the closing tag, with each
  prompt's forward once per group, equal the full rows'."""
  from tsallis_jax.sampler import SamplingConfig, generate_impl
  from tsallis_jax.train.step import TokenIds, teacher_forced_scores
  model = _model()
  graphdef, params = nnx.split(model)
  prompt_BxP, prompt_mask_BxP, _, _ = map(jnp.asarray, _sequences())
  eos, pad, close = 1, 0, 2
  sampling = SamplingConfig(num_samples=G, max_new_tokens=3 + 1 + 3, stop_ids=(eos,), pad_id=pad,
                            close_tag_ids=(close,), rationale_budget=3, answer_budget=3)
  rollout = generate_impl(graphdef, params, prompt_BxP, prompt_mask_BxP, jax.random.key(0), sampling)
  gold_NxA = jnp.repeat(jnp.asarray([[5, eos, pad], [6, 7, eos]], jnp.int32), G, axis=0)
  gold_mask_NxA = jnp.repeat(jnp.asarray([[1, 1, 0], [1, 1, 1]], bool), G, axis=0)
  ids = TokenIds(stop_ids=(eos,), pad_id=pad, close_tag_ids=(close,))
  shared = teacher_forced_scores(model, rollout, gold_NxA, gold_mask_NxA, ids, group=G)
  full = teacher_forced_scores(model, rollout, gold_NxA, gold_mask_NxA, ids)
  for got, want in zip(shared, full):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)  # -inf where no answer
  assert np.isfinite(np.asarray(full[1])).sum() >= B * G // 2  # most rows answer (the tag is forced)
