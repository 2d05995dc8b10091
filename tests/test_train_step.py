"""The jitted train step: teacher-forced sequences, the exact-match reward, sharding invariance, shared compilation.

Spec 1.6 (eq. 7): the weight w = p(y*|x, z) is the teacher-forced probability of the gold answer after the sampled
rationale and `</think>`; these tests check the spliced sequences against a direct Python construction, and that the
update on 8 devices (data x fsdp) equals the update on one device.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tsallis_jax import distributed
from tsallis_jax.model import ModelConfig, abstract_model, create_model
from tsallis_jax.sampler import Rollout
from tsallis_jax.train import loop
from tsallis_jax.train import completions as completions_lib
from tsallis_jax.train import programs as programs_lib
from tsallis_jax.train import state as state_lib
from tsallis_jax.train import step as step_lib
from tsallis_jax.train.config import TrainConfig
from tsallis_jax.train.step import TokenIds

PAD, EOS, TAG = 0, 1, 4


def _rollout(tokens_NxT, lengths_N, answer_start_N, closed_N, forced_NxT, prompt_P=(9, 9)):
  n, t = tokens_NxT.shape
  slots = np.arange(t)[None, :]
  mask = slots < lengths_N[:, None]
  answer = mask & (slots >= answer_start_N[:, None]) & closed_N[:, None]
  return Rollout(
      prompt_tokens_NxP=jnp.tile(jnp.asarray(prompt_P, jnp.int32)[None], (n, 1)),
      prompt_mask_NxP=jnp.ones((n, len(prompt_P)), bool),
      tokens_NxT=jnp.asarray(tokens_NxT, jnp.int32), logp_NxT=jnp.zeros((n, t)), model_logp_NxT=jnp.zeros((n, t)),
      mask_NxT=jnp.asarray(mask), forced_mask_NxT=jnp.asarray(forced_NxT),
      rationale_mask_NxT=jnp.asarray(mask & ~answer), answer_mask_NxT=jnp.asarray(answer),
      lengths_N=jnp.asarray(lengths_N, jnp.int32),
      answer_start_N=jnp.asarray(np.where(closed_N, answer_start_N, lengths_N), jnp.int32),
      closed_N=jnp.asarray(closed_N), forced_N=jnp.asarray(forced_NxT.any(1)), truncated_N=jnp.zeros((n,), bool),
      num_steps=jnp.int32(t))


def test_teacher_forced_completion_matches_python_splice():
  # Row 0: sampled rationale [7, 8], sampled tag, sampled answer [5, EOS]. Row 1: rationale hit the budget (3 tokens),
  # tag forced, answer [6, 6, EOS] (3 = answer budget). Row 2: stopped with EOS inside the rationale (never closed).
  tokens = np.array([[7, 8, TAG, 5, EOS, PAD, PAD, PAD],
                     [7, 7, 7, TAG, 6, 6, EOS, PAD],
                     [8, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])
  forced = np.zeros_like(tokens, bool)
  forced[1, 3] = True
  r = _rollout(tokens, np.array([5, 7, 2]), np.array([3, 4, 2]), np.array([True, True, False]), forced)
  gold = jnp.asarray([[2, 3, EOS], [2, 3, EOS], [2, 3, EOS]], jnp.int32)
  gold_mask = jnp.asarray([[1, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
  comp, z, y, valid, answered = completions_lib.teacher_forced_completion(r, gold, gold_mask, (TAG,), (EOS,), PAD)
  expect = [[7, 8, TAG, 2, 3, EOS, PAD, PAD],
            [7, 7, 7, TAG, 2, 3, EOS, PAD],
            [8, EOS, PAD, PAD, PAD, PAD, PAD, PAD]]
  np.testing.assert_array_equal(np.asarray(comp), expect)
  # z: sampled rationale tokens (the sampled tag of row 0 included, the forced tag of row 1 excluded, the EOS that
  # ended row 2 included); y: exactly the gold answer tokens, none for row 2, which never answers (w = 0).
  np.testing.assert_array_equal(np.asarray(z), [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0],
                                                [1, 1, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(y), [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0],
                                                [0, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(comp) != PAD)
  np.testing.assert_array_equal(np.asarray(answered), [True, True, False])


def _next_token_logp(model, tokens):
  """log softmax of the next-token logits after `tokens` (one row, no padding), float32, by a plain forward."""
  s = len(tokens)
  causal_1xSxS = jnp.asarray(np.tril(np.ones((s, s), bool))[None])
  logits_1xSxV, _ = model(jnp.asarray([tokens], jnp.int32), jnp.arange(s, dtype=jnp.int32)[None], causal_1xSxS)
  return np.asarray(jax.nn.log_softmax(logits_1xSxV[0, -1].astype(jnp.float32)), np.float64)


def test_eos_inside_the_rationale_scores_zero_weight_against_exact_enumeration():
  """Spec 1.6 eq. 7-8 with EOS possible: every outcome of budget-forced sampling (EOS inside the rationale, a
  sampled `</think>`, or the forced one after the budget) enumerated on a 6-token policy. The step's log p(z|x)
  must be a distribution over these outcomes (sum 1: an EOS row's score includes the EOS token) and
  sum_z p(z|x) w(z) must equal the exact P(y*|x) (an EOS row can never produce y*: w = 0, log w = -inf)."""
  vocab, budget, prompt, gold = 6, 2, (5, 2), (3, EOS)
  mcfg = ModelConfig.tiny(vocab_size=vocab, num_layers=1, embed_dim=16, mlp_dim=32, num_heads=2, num_kv_heads=2,
                          head_dim=8)
  model = create_model(mcfg, seed=3)
  graphdef, params = nnx.split(model)
  # Outcomes: (completion tokens, closed, forced tag position or None); the answer slots hold the gold answer.
  outcomes = []
  for first in range(vocab):
    if first in (EOS, TAG):
      outcomes.append(((first,), first == TAG, None))
      continue
    for second in range(vocab):
      if second in (EOS, TAG):
        outcomes.append(((first, second), second == TAG, None))
      else:
        outcomes.append(((first, second, TAG), True, 2))
  # Exact P(y*|x) and each outcome's probability by plain forwards over every prefix.
  exact_p, total = 0.0, 0.0
  for rationale, closed, forced_at in outcomes:
    sampled = rationale if forced_at is None else rationale[:forced_at]
    logp = sum(_next_token_logp(model, list(prompt) + list(sampled[:i]))[t] for i, t in enumerate(sampled))
    total += np.exp(logp)
    if closed:
      context = list(prompt) + list(rationale)
      logw = sum(_next_token_logp(model, context + list(gold[:j]))[t] for j, t in enumerate(gold))
      exact_p += np.exp(logp + logw)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)  # the enumeration covers every outcome
  # The same outcomes as one rollout batch (B = 1, G = the number of outcomes), scored by the train step's code.
  t_len = budget + 1 + len(gold)
  n = len(outcomes)
  tokens = np.full((n, t_len), PAD, np.int32)
  forced = np.zeros((n, t_len), bool)
  lengths, starts, closed_n = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, bool)
  for i, (rationale, closed, forced_at) in enumerate(outcomes):
    row = list(rationale) + (list(gold) if closed else [])
    tokens[i, :len(row)] = row
    lengths[i], starts[i], closed_n[i] = len(row), len(rationale), closed
    if forced_at is not None:
      forced[i, forced_at] = True
  rollout = _rollout(tokens, lengths, starts, closed_n, forced, prompt_P=prompt)
  cfg = BASE.replace(estimator="garl", num_samples=n, batch_size=1, rationale_budget=budget,
                     max_answer_len=len(gold), max_prompt_len=len(prompt))
  batch = {"rollout": rollout, "answer_tokens_BxA": jnp.asarray([gold], jnp.int32),
           "answer_mask_BxA": jnp.ones((1, len(gold)), bool)}
  ids = TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG,))
  logp_z_BxG, logw_BxG = jax.jit(step_lib.rationale_scores, static_argnums=(1, 2, 3))(params, graphdef, cfg, ids,
                                                                                      batch)
  logp_z_G, logw_G = np.asarray(logp_z_BxG[0], np.float64), np.asarray(logw_BxG[0], np.float64)
  eos_rows = np.array([not closed for _, closed, _ in outcomes])
  assert eos_rows.sum() == 1 + (vocab - 2)  # EOS first, or a non-stop token then EOS
  assert np.all(np.isneginf(logw_G[eos_rows])) and np.all(np.isfinite(logw_G[~eos_rows]))
  np.testing.assert_allclose(np.sum(np.exp(logp_z_G)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.sum(np.exp(logp_z_G + logw_G)), exact_p, rtol=1e-5)


def test_measure_p0_gives_zero_weight_to_rationales_that_end_with_eos(monkeypatch):
  """measure_p0 (pretrain.py, through success.make_scorer) on rollouts that all sample EOS at the first rationale token: p0 = 0 exactly, since
  none of them answers; rollouts that close the rationale at once get w = p(y*|x, </think>) > 0."""
  from tsallis_jax.data import synthetic
  from tsallis_jax.sampler import generate_impl
  from tsallis_jax.train import pretrain, success
  tokenizer = synthetic.make_tokenizer()
  records = synthetic.make_records(synthetic.target_task(1e-2), 8, seed=0)
  eos, close = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")
  mcfg = ModelConfig.tiny(vocab_size=len(tokenizer), num_layers=1, embed_dim=16, mlp_dim=32, num_heads=2,
                          num_kv_heads=2, head_dim=8)
  graphdef, params = nnx.split(create_model(mcfg, seed=0))

  def first_token_is(token):
    def fake_generate(graphdef_, params_, prompt_BxP, mask_BxP, key, sampling):
      r = generate_impl(graphdef_, params_, prompt_BxP, mask_BxP, key, sampling)
      n, t = r.tokens_NxT.shape
      first_N = jnp.zeros((n, t), bool).at[:, 0].set(True)
      closed = token == close
      return r.replace(tokens_NxT=jnp.where(first_N, token, tokenizer.pad_token_id), mask_NxT=first_N,
                       forced_mask_NxT=jnp.zeros((n, t), bool), rationale_mask_NxT=first_N,
                       answer_mask_NxT=jnp.zeros((n, t), bool), lengths_N=jnp.ones((n,), jnp.int32),
                       answer_start_N=jnp.ones((n,), jnp.int32), closed_N=jnp.full((n,), closed),
                       forced_N=jnp.zeros((n,), bool), truncated_N=jnp.full((n,), closed))
    return fake_generate

  kwargs = dict(num_samples=2, max_prompt_len=32, rationale_budget=4, max_answer_len=4, batch_size=4)
  monkeypatch.setattr(success, "generate_impl", first_token_is(eos))
  assert pretrain.measure_p0(graphdef, params, records, tokenizer, **kwargs)["p0_likelihood"] == 0.0
  monkeypatch.setattr(success, "generate_impl", first_token_is(close))
  assert pretrain.measure_p0(graphdef, params, records, tokenizer, **kwargs)["p0_likelihood"] > 0.0


def test_exact_match_reward():
  tokens = np.array([[7, TAG, 2, 3, EOS, PAD], [7, TAG, 2, 3, 3, PAD], [7, TAG, 2, EOS, PAD, PAD],
                     [2, 3, EOS, PAD, PAD, PAD]])
  r = _rollout(tokens, np.array([5, 5, 4, 3]), np.array([2, 2, 2, 3]), np.array([True, True, True, False]),
               np.zeros_like(tokens, bool))
  gold = jnp.asarray([[2, 3, EOS, PAD]] * 4, jnp.int32)
  gold_mask = jnp.asarray([[1, 1, 1, 0]] * 4, bool)
  reward = completions_lib.exact_match_reward(r, gold, gold_mask)
  # Only row 0 answers exactly [2, 3, EOS]; row 1 lacks the EOS, row 2 is a prefix, row 3 never closed.
  np.testing.assert_array_equal(np.asarray(reward), [1.0, 0.0, 0.0, 0.0])


def _setup(cfg, mesh, seed=0, vocab=32, ids=TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG,))):
  mcfg = ModelConfig.tiny(vocab_size=vocab, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2)
  graphdef, abstract_vars = nnx.split(abstract_model(mcfg))
  programs = programs_lib.build_programs(cfg, graphdef, abstract_vars, mesh, ids, mcfg.sharding_rules)
  params = state_lib.pure(nnx.state(create_model(mcfg, seed=seed)))
  params = jax.device_get(params)
  state = state_lib.init_state(params, programs.tx, cfg.seed, programs.state_shardings, True)
  return programs, state


@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)])
def test_init_state_donates_the_params_and_copies_only_the_reference(mesh_shape):
  """`init_state(..., donate=True)` makes the given arrays the state's params (no copy; they are deleted for the
  caller), copies them once for `ref_params`, and builds the same state bit for bit as without donation. numpy params,
  or params on other shardings than the state's, are copied (and kept) as without it, with no donation warning."""
  import warnings
  data, fsdp = mesh_shape
  mesh = distributed.make_mesh({"data": data, "fsdp": fsdp}, devices=jax.devices()[:data * fsdp])
  mcfg = ModelConfig.tiny(vocab_size=32, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2)
  graphdef, abstract_vars = nnx.split(abstract_model(mcfg))
  programs = programs_lib.build_programs(BASE, graphdef, abstract_vars, mesh, TokenIds((EOS,), PAD, (TAG,)),
                                         mcfg.sharding_rules)
  sh, tx = programs.state_shardings, programs.tx
  params = state_lib.pure(nnx.state(create_model(mcfg, seed=0, mesh=mesh)))
  host = jax.tree.map(lambda x: np.array(x, copy=True), params)  # copies: a view would pin the buffers
  expected = jax.device_get(state_lib.init_state(host, tx, 0, sh, True))
  single = state_lib.pure(nnx.state(create_model(mcfg, seed=1)))  # one device: not the state's shardings on (4, 2)
  single_host = jax.tree.map(lambda x: np.array(x, copy=True), single)
  expected_single = jax.device_get(state_lib.init_state(single_host, tx, 0, sh, True))
  pointers = {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(params) for s in x.addressable_shards}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "Some donated buffers were not usable" would fail here
    state = state_lib.init_state(params, tx, 0, sh, True, donate=True)
    from_numpy = state_lib.init_state(host, tx, 0, sh, True, donate=True)
    from_single = state_lib.init_state(single, tx, 0, sh, True, donate=True)
  assert all(x.is_deleted() for x in jax.tree.leaves(params))
  assert {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(state.params) for s in x.addressable_shards} == pointers
  assert not pointers & {s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(state.ref_params)
                         for s in x.addressable_shards}
  assert (mesh_shape == (1, 1)) == all(x.is_deleted() for x in jax.tree.leaves(single))  # equivalent on 1 device
  for built, want in ((state, expected), (from_numpy, expected), (from_single, expected_single)):
    got = jax.device_get(built)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _batch(cfg, mesh, seed=0, vocab=32):
  rng = np.random.default_rng(seed)
  b, p, a = cfg.batch_size, cfg.max_prompt_len, cfg.max_answer_len
  prompts = rng.integers(5, vocab, size=(b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  mask[:, :2] = False  # left padding
  answers = rng.integers(5, vocab, size=(b, a)).astype(np.int32)
  answers[:, -1] = EOS
  local = {"prompt_tokens_BxP": prompts, "prompt_mask_BxP": mask, "answer_tokens_BxA": answers,
           "answer_mask_BxA": np.ones((b, a), bool)}
  return loop._put_rows(mesh, local, b)


def token_rewards(cfg, mesh, rollout, answers):
  """rewards_BxG by token-id exact match (these tests have token ids but no tokenizer): what the string reward
  `strict_match` computes on a word-level tokenizer (test_scoring.py checks that equivalence)."""
  g = cfg.num_samples
  reward_N = completions_lib.exact_match_reward(jax.device_get(rollout),
                                                np.repeat(jax.device_get(answers["answer_tokens_BxA"]), g, axis=0),
                                                np.repeat(jax.device_get(answers["answer_mask_BxA"]), g, axis=0))
  return loop._put_rows(mesh, {"rewards_BxG": np.asarray(reward_N).reshape(-1, g)}, cfg.batch_size)["rewards_BxG"]


def train_batch_of(cfg, mesh, rollout, answers):
  return {"rollout": rollout, "answer_tokens_BxA": answers["answer_tokens_BxA"],
          "answer_mask_BxA": answers["answer_mask_BxA"], "rewards_BxG": token_rewards(cfg, mesh, rollout, answers)}


def _sampled_batch(programs, state, cfg, mesh):
  """The train batch of step 0 (`_batch`'s prompts and answers, their rollout, its rewards) and the step key."""
  batch = _batch(cfg, mesh)
  rollout_key, step_key = loop._step_keys(state.key, 0)
  rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
  return train_batch_of(cfg, mesh, rollout, batch), step_key


def _one_step(cfg, mesh, q=0.75):
  programs, state = _setup(cfg, mesh)
  train_batch, step_key = _sampled_batch(programs, state, cfg, mesh)
  rollout = train_batch["rollout"]
  state, metrics = programs.train_step(state, train_batch, step_key, jnp.asarray([q, q], jnp.float32))
  return jax.device_get(state.params), jax.device_get(metrics), jax.device_get(rollout.tokens_NxT)


BASE = TrainConfig(max_prompt_len=6, rationale_budget=4, max_answer_len=3, num_samples=4, batch_size=8,
                   eval_batch_size=8, num_steps=10, learning_rate=1e-2, progress_bar="off")


@pytest.mark.parametrize("estimator", ["garl", "paft"])
def test_update_on_8_devices_equals_one_device(estimator):
  # adam_eps 1e-6: Adam's first step is lr * g / (|g| + eps), a sign function on coordinates with |g| << eps, and
  # the 8-shard reductions run in another float order; with eps 1e-8 a 1e-7 gradient's rounding noise moved a
  # parameter by a few % of lr. 1e-6 keeps the check about sharding, not about amplified rounding.
  cfg = BASE.replace(estimator=estimator, adam_eps=1e-6, update_norm_metric=True)
  assert jax.device_count() == 8
  mesh_8 = distributed.make_mesh({"data": 4, "fsdp": 2})
  mesh_1 = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  params_8, metrics_8, tokens_8 = _one_step(cfg, mesh_8)
  params_1, metrics_1, tokens_1 = _one_step(cfg, mesh_1)
  np.testing.assert_array_equal(tokens_8, tokens_1)  # same samples, so the same estimator input
  # Reductions run in a different order over 8 shards; Adam's first step turns that float noise into up to ~1e-3 lr
  # on coordinates whose gradient is near 0, hence atol = 1e-2 lr on params.
  chex.assert_trees_all_close(params_8, params_1, atol=1e-2 * cfg.learning_rate, rtol=1e-4)
  for k in ("loss", "grad_norm", "update_norm", "reward/mean", "gen/len_mean", "weight/mean"):
    np.testing.assert_allclose(metrics_8[k], metrics_1[k], rtol=1e-4, atol=1e-6)
  chex.assert_tree_all_finite(metrics_8)
  assert metrics_8["grad_norm"] > 0


def test_update_norm_is_the_norm_of_the_parameter_change_and_only_logged_when_asked():
  """`update_norm_metric` adds the global norm of the optimizer's update, ||theta' - theta||, and changes nothing
  else: the same parameters (to float32 rounding: the program fuses differently) and the same other metrics."""
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  out = {}
  for flag in (False, True):
    cfg = BASE.replace(estimator="garl", update_norm_metric=flag)
    programs, state = _setup(cfg, mesh)
    before = jax.device_get(state.params)
    train_batch, step_key = _sampled_batch(programs, state, cfg, mesh)
    state, metrics = programs.train_step(state, train_batch, step_key, jnp.asarray([0.75, 0.75], jnp.float32))
    out[flag] = before, jax.device_get(state.params), jax.device_get(metrics)
  (before, after_off, metrics_off), (_, after_on, metrics_on) = out[False], out[True]
  assert "update_norm" not in metrics_off
  change = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), after_on, before)
  np.testing.assert_allclose(metrics_on["update_norm"], float(optax.tree.norm(change)), rtol=1e-4)
  assert metrics_on["update_norm"] > 0
  chex.assert_trees_all_close(after_on, after_off, rtol=1e-6, atol=1e-9)
  assert set(metrics_on) - set(metrics_off) == {"update_norm"}
  for k in metrics_off:
    np.testing.assert_allclose(metrics_on[k], metrics_off[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_runs_differing_in_q_share_one_compiled_step():
  """Programs are values: those built for one config serve a config that differs only in neutral keys (q, seed,
  name), and are refused, naming the keys, for one whose programs differ."""
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  cfg = BASE.replace(estimator="garl")
  programs, _ = _setup(cfg.replace(q=0.0, seed=1), mesh)
  ids = TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG,))
  graphdef = nnx.split(abstract_model(ModelConfig.tiny(vocab_size=32, num_layers=1, embed_dim=32, mlp_dim=64,
                                                       num_heads=2, num_kv_heads=2)))[0]
  programs.check(cfg.replace(q=1.0, seed=2, name="other"), graphdef, mesh, ids)
  with pytest.raises(ValueError, match=r"config keys \['estimator'\]"):
    programs.check(cfg.replace(estimator="paft"), graphdef, mesh, ids)
  with pytest.raises(ValueError, match="the token ids"):
    programs.check(cfg, graphdef, mesh, TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG, TAG)))
  params_0, metrics_0, _ = _one_step(cfg, mesh, q=0.0)
  params_1, metrics_1, _ = _one_step(cfg, mesh, q=1.0)
  assert metrics_0["jq/q"] == 0.0 and metrics_1["jq/q"] == 1.0
  # q = 1 amplifies a low-P group by 1/P-hat, so the two updates differ.
  assert not np.allclose(jax.tree.leaves(params_0)[0], jax.tree.leaves(params_1)[0])


def test_pathwise_term_trains_the_gold_answer(monkeypatch):
  """GARL's pathwise term -sg(A w) log w (spec 2.2) is what trains the gold answer: five AdamW steps on one batch
  with the step's gradient raise the mean teacher-forced w = p(y*|x, z) more than tenfold, while the same steps with
  the pathwise term removed (log w stop-gradiented inside the step's GARL loss) leave it near where it started."""
  from tsallis_jax.estimators import garl_loss
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  cfg = BASE.replace(estimator="garl", q=1.0, learning_rate=3e-2)
  programs, state = _setup(cfg, mesh)
  batch = _batch(cfg, mesh)
  rollout_key, step_key = loop._step_keys(state.key, 0)
  rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
  train_batch = jax.device_get(train_batch_of(cfg, mesh, rollout, batch))
  params0 = jax.device_get(state.params)
  graphdef = nnx.split(abstract_model(ModelConfig.tiny(vocab_size=32, num_layers=1, embed_dim=32, mlp_dim=64,
                                                       num_heads=2, num_kv_heads=2)))[0]
  ids = TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(TAG,))

  def weights_over_five_steps():
    grad_fn = jax.jit(lambda p, b: step_lib.loss_and_metrics(p, None, graphdef, cfg, ids, b, step_key, cfg.q))
    tx = programs.tx
    params, opt_state, weights = params0, tx.init(params0), []
    for _ in range(5):
      grads, metrics = grad_fn(params, train_batch)
      weights.append(float(metrics["weight/mean"]))
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return weights

  full = weights_over_five_steps()
  monkeypatch.setattr(step_lib, "garl_loss",
                      lambda logp_z, logw, **kw: garl_loss(logp_z, jax.lax.stop_gradient(logw), **kw))
  without_path = weights_over_five_steps()
  assert full[0] == without_path[0]
  assert full[-1] > 10 * full[0], full
  assert full[-1] > 10 * without_path[-1], (full, without_path)


# The jitted step against an independent computation: a plain forward of the same rollouts (model call, float32
# log_softmax, gather), with the spliced sequences and masks built row by row in Python from the spec (1.6 eq. 7):
# [prompt, sampled rationale (forced tag unscored), gold answer]; a rationale ended by EOS keeps the EOS in z and has
# no answer (w = 0); GRPO scores the sampled completion with the exact-match reward.

VOCAB = 12  # small, so that some rollouts sample EOS inside their rationale


def _plain_token_logprobs(params, graphdef, tokens_NxS, pad_NxS):
  """log p(token_s | tokens_<s) for s >= 1 (position 0 gets 0), by a plain model call on padded rows."""
  s = tokens_NxS.shape[1]
  positions_NxS = np.maximum(np.cumsum(pad_NxS, axis=1) - 1, 0).astype(np.int32)
  attend_NxSxS = np.tril(np.ones((s, s), bool))[None] & pad_NxS[:, None, :]
  logits_NxSxV, _ = nnx.merge(graphdef, params)(jnp.asarray(tokens_NxS), jnp.asarray(positions_NxS),
                                                jnp.asarray(attend_NxSxS))
  logq_NxSxV = jax.nn.log_softmax(logits_NxSxV.astype(jnp.float32), axis=-1)
  picked_NxS1 = jnp.take_along_axis(logq_NxSxV[:, :-1], jnp.asarray(tokens_NxS)[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked_NxS1, ((0, 0), (1, 0)))


def _prompt_rows(r):
  return [list(np.asarray(r.prompt_tokens_NxP[n])[np.asarray(r.prompt_mask_NxP[n])])
          for n in range(r.tokens_NxT.shape[0])]


def _pad_rows(rows, score_masks):
  """Right-pads token rows; returns tokens, pad mask and each score mask as N x S arrays."""
  s = max(len(row) for row in rows)
  tokens = np.full((len(rows), s), PAD, np.int32)
  pad = np.zeros((len(rows), s), bool)
  masks = [np.zeros((len(rows), s), bool) for _ in score_masks]
  for n, row in enumerate(rows):
    tokens[n, :len(row)], pad[n, :len(row)] = row, True
    for mask, positions in zip(masks, score_masks):
      mask[n, positions[n]] = True
  return tokens, pad, masks


def _teacher_forced_rows(r, gold_BxA, gold_mask_BxA, G):
  """Per row: the token list [prompt, rationale, tag, gold], z and y positions, and whether it answers."""
  rows, z_pos, y_pos, answered = [], [], [], []
  for n, prompt in enumerate(_prompt_rows(r)):
    length = int(r.lengths_N[n])
    toks, forced = list(np.asarray(r.tokens_NxT[n, :length])), np.asarray(r.forced_mask_NxT[n, :length])
    if bool(r.closed_N[n]):
      rationale = toks[:int(r.answer_start_N[n])]
      gold = list(gold_BxA[n // G][gold_mask_BxA[n // G]])
      answers = True
    else:
      assert toks[-1] == EOS  # under budget forcing an unclosed rollout stopped inside its rationale
      rationale, gold, answers = toks, [], False
    p = len(prompt)
    rows.append(prompt + rationale + gold)
    z_pos.append([p + i for i in range(len(rationale)) if not forced[i]])
    y_pos.append([p + len(rationale) + j for j in range(len(gold))])
    answered.append(answers)
  return rows, z_pos, y_pos, np.asarray(answered)


def _sgd_step_grads(cfg, mesh, gold_from_samples=False):
  """The jitted step's gradient (plain SGD at lr 1: params before - after), its inputs and the host rollout."""
  programs, state = _setup(cfg, mesh, vocab=VOCAB)
  batch = _batch(cfg, mesh, vocab=VOCAB)
  rollout_key, step_key = loop._step_keys(state.key, 0)
  rollout = programs.train_rollout(state.params, batch["prompt_tokens_BxP"], batch["prompt_mask_BxP"], rollout_key)
  r = jax.device_get(rollout)
  gold_BxA = np.array(jax.device_get(batch["answer_tokens_BxA"]))
  gold_mask_BxA = np.ones(gold_BxA.shape, bool)
  if gold_from_samples:  # each group's gold answer is its first closed rollout's answer: some rewards are 1
    for b in range(cfg.batch_size):
      closed = [n for n in range(b * cfg.num_samples, (b + 1) * cfg.num_samples) if r.closed_N[n]]
      if closed:
        answer = np.asarray(r.tokens_NxT[closed[0]])[np.asarray(r.answer_mask_NxT[closed[0]])]
        gold_BxA[b, :len(answer)], gold_mask_BxA[b] = answer, np.arange(gold_BxA.shape[1]) < len(answer)
  answers = loop._put_rows(mesh, {"answer_tokens_BxA": gold_BxA, "answer_mask_BxA": gold_mask_BxA},
                           cfg.batch_size)
  params = jax.device_get(state.params)
  new_state, _ = programs.train_step(state, train_batch_of(cfg, mesh, rollout, answers), step_key,
                                     jnp.asarray([cfg.q, cfg.q], jnp.float32))
  grads = jax.tree.map(lambda a, b: a - b, params, jax.device_get(new_state.params))
  graphdef = nnx.split(abstract_model(ModelConfig.tiny(vocab_size=VOCAB, num_layers=1, embed_dim=32, mlp_dim=64,
                                                       num_heads=2, num_kv_heads=2)))[0]
  return grads, params, graphdef, r, gold_BxA, gold_mask_BxA, step_key


def _assert_grads_close(got, want):
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), got, want)


SGD = dict(optimizer="sgd", learning_rate=1.0, grad_clip=0.0, num_samples=4, batch_size=8)


@pytest.mark.parametrize("estimator, q", [("garl", 0.75), ("garl", 1.0), ("paft", 0.5)])
def test_step_gradient_equals_the_estimator_on_an_independent_forward(estimator, q):
  """GARL / PAFT gradients of the jitted step = jax.grad of garl_loss / paft_loss on log p(z|x) and log w from a
  separate plain forward of the same rollouts (EOS-ended rationales included)."""
  from tsallis_jax.estimators import garl_loss, paft_loss
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  cfg = BASE.replace(estimator=estimator, q=q, **SGD)
  grads, params, graphdef, r, gold_BxA, gold_mask_BxA, step_key = _sgd_step_grads(cfg, mesh)
  B, G = cfg.batch_size, cfg.num_samples
  rows, z_pos, y_pos, answered_N = _teacher_forced_rows(r, gold_BxA, gold_mask_BxA, G)
  assert 0 < np.sum(~answered_N) < len(rows), "want some rollouts that end with EOS inside the rationale"
  tokens_NxS, pad_NxS, (z_NxS, y_NxS) = _pad_rows(rows, (z_pos, y_pos))

  def loss_fn(p):
    logp_NxS = _plain_token_logprobs(p, graphdef, tokens_NxS, pad_NxS)
    logp_z_BxG = jnp.sum(jnp.where(z_NxS, logp_NxS, 0.0), axis=1).reshape(B, G)
    logw_BxG = jnp.where(answered_N, jnp.sum(jnp.where(y_NxS, logp_NxS, 0.0), axis=1), -jnp.inf).reshape(B, G)
    if estimator == "garl":
      return garl_loss(logp_z_BxG, logw_BxG, q=q, baseline=cfg.baseline)[0]
    return paft_loss(logp_z_BxG, logw_BxG, jax.random.split(step_key, B), q=q, num_resamples=cfg.resamples)[0]

  _assert_grads_close(grads, jax.grad(loss_fn)(params))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_step_grpo_gradient_equals_a_hand_aggregation(loss_type):
  """GRPO in the trainer (grpo_loss_type, TRL semantics) against a hand computation: advantages from exact-match
  rewards (group std, ddof 1, eps 1e-4), one on-policy step, per-token weights grpo 1/(N |o_n|), bnpo and dapo
  1/(completion tokens), dr_grpo 1/(N T) with T the completion buffer, on a plain forward of the sampled tokens."""
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  cfg = BASE.replace(estimator="grpo", grpo_loss_type=loss_type, **SGD)
  grads, params, graphdef, r, gold_BxA, gold_mask_BxA, _ = _sgd_step_grads(cfg, mesh, gold_from_samples=True)
  B, G = cfg.batch_size, cfg.num_samples
  N, T = r.tokens_NxT.shape
  rows, o_pos, reward_N = [], [], np.zeros(N)
  for n, prompt in enumerate(_prompt_rows(r)):
    length = int(r.lengths_N[n])
    toks, forced = list(np.asarray(r.tokens_NxT[n, :length])), np.asarray(r.forced_mask_NxT[n, :length])
    start = int(r.answer_start_N[n])
    gold = list(gold_BxA[n // G][gold_mask_BxA[n // G]])
    reward_N[n] = float(bool(r.closed_N[n]) and toks[start:] == gold)
    rows.append(prompt + toks)
    o_pos.append([len(prompt) + i for i in range(length) if not forced[i]])
  reward_BxG = reward_N.reshape(B, G)
  assert 0 < reward_BxG.mean() < 1
  std_B1 = reward_BxG.std(axis=1, ddof=1, keepdims=True)
  adv_N = np.where(std_B1 > 0, (reward_BxG - reward_BxG.mean(1, keepdims=True)) / (std_B1 + 1e-4), 0.0).reshape(N)
  tokens_NxS, pad_NxS, (o_NxS,) = _pad_rows(rows, (o_pos,))
  count_N = o_NxS.sum(1)
  weight_N = {"grpo": 1.0 / (N * count_N), "bnpo": np.full(N, 1.0 / o_NxS.sum()),
              "dapo": np.full(N, 1.0 / o_NxS.sum()), "dr_grpo": np.full(N, 1.0 / (N * T))}[loss_type]
  coef_NxS = np.where(o_NxS, -(adv_N * weight_N)[:, None], 0.0).astype(np.float32)

  def loss_fn(p):
    return jnp.sum(coef_NxS * _plain_token_logprobs(p, graphdef, tokens_NxS, pad_NxS))

  _assert_grads_close(grads, jax.grad(loss_fn)(params))


def _two_token_tag_tokenizer():
  """A word-level tokenizer in which `</think>` is two tokens, `</` and `think>`."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  words = {"<pad>": PAD, "<eos>": EOS, "</": 2, "think>": 3, **{f"t{i}": i for i in range(4, 32)}}
  backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
  backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Split(Regex("</"), behavior="isolated")])
  return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def test_a_two_token_closing_tag_through_the_sampler_and_the_train_step():
  """`</think>` of two tokens: the rollout buffer holds rationale + 2 + answer tokens, budget forcing feeds both tag
  tokens, teacher forcing splices the gold answer after them, and the step trains on the result."""
  tag = tuple(_two_token_tag_tokenizer().encode("</think>", add_special_tokens=False))
  assert tag == (2, 3)
  cfg = BASE.replace(estimator="garl", batch_size=2, eval_batch_size=2)
  mesh = distributed.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  programs, state = _setup(cfg, mesh, ids=TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=tag))
  train_batch, step_key = _sampled_batch(programs, state, cfg, mesh)
  rollout = jax.device_get(train_batch["rollout"])

  budget, T = cfg.rationale_budget, cfg.rollout_len(len(tag))
  assert rollout.tokens_NxT.shape[1] == T == budget + 2 + cfg.max_answer_len
  forced_N = np.asarray(rollout.forced_N)
  assert forced_N.any()  # this key leaves some rows unclosed at the budget
  np.testing.assert_array_equal(np.asarray(rollout.tokens_NxT)[forced_N, budget:budget + 2],
                                np.broadcast_to(tag, (int(forced_N.sum()), 2)))
  np.testing.assert_array_equal(np.asarray(rollout.answer_start_N)[forced_N], budget + 2)

  gold_NxA = jnp.repeat(train_batch["answer_tokens_BxA"], cfg.num_samples, axis=0)
  gold_mask_NxA = jnp.repeat(train_batch["answer_mask_BxA"], cfg.num_samples, axis=0)
  comp_NxT, z_NxT, y_NxT, _, answered_N = completions_lib.teacher_forced_completion(
      rollout, gold_NxA, gold_mask_NxA, tag, (EOS,), PAD)
  comp_NxT, z_NxT, y_NxT = np.asarray(comp_NxT), np.asarray(z_NxT), np.asarray(y_NxT)
  for n in range(comp_NxT.shape[0]):
    if not bool(rollout.closed_N[n]):
      continue
    start = int(rollout.answer_start_N[n])
    np.testing.assert_array_equal(comp_NxT[n, start - 2:start], tag)  # the tag, sampled or forced
    np.testing.assert_array_equal(comp_NxT[n, start:start + cfg.max_answer_len], np.asarray(gold_NxA[n]))
    assert y_NxT[n].sum() == cfg.max_answer_len and y_NxT[n, start:].all()
    assert not z_NxT[n, start - 2:start].any() or not bool(rollout.forced_N[n])  # forced tag tokens are not z
  assert np.asarray(answered_N)[np.asarray(rollout.closed_N)].all()

  _, metrics = programs.train_step(state, train_batch, step_key, jnp.asarray([0.75, 0.75], jnp.float32))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  assert metrics["gen/forced_frac"] == forced_N.mean()
