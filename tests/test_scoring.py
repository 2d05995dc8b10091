"""Rewards on the host between rollout and update (train/scoring.py, rewards.get_reward_func; spec 1.7).

The default training reward `strict_match` compares strings; on the synthetic task's word-level tokenizer it must
equal the token-id exact match the step computed in jit before (same training numbers for the demo). User functions
`(completions, records, **columns) -> list[float]` come by dotted path; bad output raises a clear error; on 8
devices each row's reward lands on the row's device.
"""
import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tsallis_jax import distributed
from tsallis_jax import rewards as rewards_lib
from tsallis_jax.data import synthetic
from tsallis_jax.data.records import Record
from tsallis_jax.model import ModelConfig, create_model
from tsallis_jax.sampler import SamplingConfig, generate_impl
from tsallis_jax.train import evaluate as eval_lib
from tsallis_jax.train import completions as completions_lib
from tsallis_jax.train import scoring, success
from tsallis_jax.train.config import ConfigError, TrainConfig
from tsallis_jax.train.step import batch_sharding


def half_reward(completions, records, **columns):
  """A user reward by dotted path (`tests.test_scoring:half_reward`): 0.5 for every completion."""
  assert len(columns["answer"]) == len(completions) == len(records)
  return [0.5] * len(completions)


def _sampled(seed, num_samples=16, answer_budget=3):
  tok = synthetic.make_tokenizer()
  records = synthetic.make_records(synthetic.target_task(1e-1), 8, seed=seed)
  mcfg = ModelConfig.tiny(vocab_size=len(tok), num_layers=1, embed_dim=16, mlp_dim=32, num_heads=2, num_kv_heads=2,
                          head_dim=8)
  graphdef, params = nnx.split(create_model(mcfg, seed=seed))
  close = tok.convert_tokens_to_ids("</think>")
  sampling = SamplingConfig(num_samples=num_samples, max_new_tokens=3 + 1 + answer_budget, temperature=1.0,
                            stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, close_tag_ids=(close,),
                            rationale_budget=3, answer_budget=answer_budget)
  prompt_BxP, mask_BxP = eval_lib.prompt_arrays(records, tok, style="cold", max_prompt_len=24,
                                                pad_id=tok.pad_token_id)
  rollout = jax.device_get(jax.jit(generate_impl, static_argnums=(0, 5))(
      graphdef, params, prompt_BxP, mask_BxP, jax.random.key(seed), sampling))
  return tok, records, rollout


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strict_match_on_strings_equals_token_exact_match_on_sampled_rollouts(seed):
  tok, records, r = _sampled(seed)
  G = r.tokens_NxT.shape[0] // len(records)
  # Each group's gold answer is the answer of its first closed rollout made only of words and ended by EOS (so some
  # rewards are 1); the rest of the samples are whatever the random model wrote (stray `</think>`, `answer`, `.`,
  # `<pad>`, `<unk>`, unterminated answers ...).
  gold_records = []
  for b, record in enumerate(records):
    for n in range(b * G, (b + 1) * G):
      answer = list(np.asarray(r.tokens_NxT[n])[np.asarray(r.answer_mask_NxT[n])])
      if r.closed_N[n] and len(answer) >= 2 and answer[-1] == tok.eos_token_id and min(answer[:-1]) >= 5:
        record = dataclasses.replace(record, answer=" ".join(tok.convert_ids_to_tokens(answer[:-1])))
        break
    gold_records.append(record)
  gold_BxA, gold_mask_BxA = success.answer_arrays(gold_records, tok, max_answer_len=3)
  token_N = np.asarray(completions_lib.exact_match_reward(r, np.repeat(gold_BxA, G, axis=0),
                                                      np.repeat(gold_mask_BxA, G, axis=0)))
  completions = eval_lib.decode_completions(tok, r.tokens_NxT, r.lengths_N)
  string_N = np.asarray(rewards_lib.call_reward_func(rewards_lib.get_reward_func("strict_match"), completions,
                                                     [rec for rec in gold_records for _ in range(G)]))
  np.testing.assert_array_equal(string_N, token_N)
  assert 0 < token_N.sum() < len(token_N)
  # The lenient evaluation match is not the same reward: it credits answers the token match rejects, or agrees.
  lenient_N = np.asarray([rewards_lib.get_reward("exact_match")(c, rec) for c, rec in
                          zip(completions, [rec for rec in gold_records for _ in range(G)])])
  assert np.all(lenient_N >= string_N)


def test_answer_segment_and_strict_match():
  record = Record(id="x", question="q", answer="Paris", aliases=("paris city",))
  strict = rewards_lib.get_reward("strict_match")
  assert rewards_lib.answer_segment("a b </think> Paris <eos>") == "Paris"
  assert rewards_lib.answer_segment("no tag Paris") == ""
  assert strict("r </think> Paris<|im_end|>", record) == 1.0
  assert strict("r </think>  paris city \n", record) == 1.0
  assert strict("r </think> paris <eos>", record) == 0.0  # no case folding
  assert strict("r </think> Paris <pad>", record) == 0.0  # padding is not a stop token
  assert strict("r </think> x </think> Paris <eos>", record) == 0.0  # the answer starts at the first tag
  assert strict("r </think> Answer: Paris <eos>", record) == 0.0  # no extraction
  assert rewards_lib.get_reward("exact_match")("r </think> Answer: Paris <eos>", record) == 1.0


def test_reward_funcs_by_name_and_dotted_path_with_weights():
  cfg = TrainConfig(reward_funcs="strict_match, tests.test_scoring:half_reward", reward_weights="1,0.5")
  funcs = scoring.RewardFuncs.from_config(cfg)
  record = Record(id="x", question="q", answer="7")
  got = funcs(["z </think> 7 <eos>", "z </think> 8 <eos>"], [record, record])
  np.testing.assert_array_equal(got, np.asarray([1.25, 0.25], np.float32))
  assert TrainConfig().reward_funcs == "strict_match"


def test_bad_reward_funcs_raise_input_errors_naming_the_function_and_row():
  record = Record(id="r7", question="q", answer="7", source="mine.jsonl", index=3)
  with pytest.raises(rewards_lib.RewardFuncError, match="returned 1 values for 2 completions"):
    rewards_lib.call_reward_func(lambda c, r, **k: [1.0], ["a", "b"], [record, record])
  with pytest.raises(rewards_lib.RewardFuncError, match=r"returned nan for completion 1 \(mine.jsonl, record 3"):
    rewards_lib.call_reward_func(lambda c, r, **k: [1.0, float("nan")], ["a", "b"], [record, record])
  with pytest.raises(rewards_lib.RewardFuncError, match="one float per completion"):
    rewards_lib.call_reward_func(lambda c, r, **k: None, ["a"], [record])
  with pytest.raises(rewards_lib.RewardFuncError, match="cannot import module 'no_such_pkg.rewards'"):
    rewards_lib.get_reward_func("no_such_pkg.rewards:fn")
  with pytest.raises(rewards_lib.RewardFuncError, match="has no callable 'nope'"):
    rewards_lib.get_reward_func("tests.test_scoring:nope")
  with pytest.raises(ConfigError, match="neither registered"):
    TrainConfig(reward_funcs="bleu")
  with pytest.raises(ConfigError, match="must hold 2 finite"):
    TrainConfig(reward_funcs="strict_match,exact_match", reward_weights="1")
  assert issubclass(rewards_lib.RewardFuncError, ValueError)


def test_rollout_rewards_on_8_devices_put_each_row_on_its_device():
  tok, records, r = _sampled(0, num_samples=4)
  mesh = distributed.make_mesh({"data": 4, "fsdp": 2})
  sharded = jax.device_put(r, batch_sharding(mesh, r))
  funcs = scoring.RewardFuncs((rewards_lib.get_reward_func("strict_match"), half_reward), (1.0, 2.0))
  rewards_BxG = scoring.rollout_rewards(funcs, sharded, records, tok, mesh, len(records))
  completions = eval_lib.decode_completions(tok, r.tokens_NxT, r.lengths_N)
  want = funcs(completions, [rec for rec in records for _ in range(4)]).reshape(len(records), 4)
  np.testing.assert_array_equal(np.asarray(rewards_BxG), want)
  assert rewards_BxG.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  # A process holding only rows 8..15 of the 32 reads them from its shards.
  np.testing.assert_array_equal(scoring.local_rows(sharded.tokens_NxT, slice(8, 16)), r.tokens_NxT[8:16])


def test_training_reward_is_the_users_function(tmp_path):
  """The loop trains on the user's reward: GRPO with a constant 0.5 reward logs `reward` (TRL's name for the
  internal reward/mean) 0.5 and no gradient (every group has zero std)."""
  from tsallis_jax.train import load_config, train_and_evaluate
  from tsallis_jax.train.writers import read_metrics
  cfg = load_config("smoke", ["num_steps=2", "eval_every=0", "checkpoint_every=0", "estimator=grpo",
                              "reward_funcs=tests.test_scoring:half_reward", "log_ref_kl=false"])
  train_and_evaluate(cfg, str(tmp_path))
  rows = [row for row in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in row]
  assert [row["reward"] for row in rows] == [0.5, 0.5]
  assert all(row["frac_reward_zero_std"] == 1.0 and row["grad_norm"] == 0.0 for row in rows)
  assert [(row["rewards/half_reward/mean"], row["rewards/half_reward/std"]) for row in rows] == [(0.5, 0.0)] * 2


def test_per_function_rewards_are_logged_under_trls_names():
  """`rollout_reward_table` returns each function's own rewards next to the weighted sum, and
  `reward_func_metrics` gives TRL's `rewards/<name>/mean|std` (Bessel-corrected) from them, on 8 devices."""
  tok, records, r = _sampled(0, num_samples=4)
  mesh = distributed.make_mesh({"data": 4, "fsdp": 2})
  sharded = jax.device_put(r, batch_sharding(mesh, r))
  funcs = scoring.RewardFuncs((rewards_lib.get_reward_func("strict_match"), half_reward, half_reward), (1.0, 2.0, 0.0))
  assert funcs.names == ("strict_match", "half_reward_1", "half_reward_2")
  rewards_BxG, per_func_BxGxF = scoring.rollout_reward_table(funcs, sharded, records, tok, mesh, len(records))
  completions = eval_lib.decode_completions(tok, r.tokens_NxT, r.lengths_N)
  repeated = [rec for rec in records for _ in range(4)]
  strict_N = np.asarray(rewards_lib.call_reward_func(rewards_lib.get_reward_func("strict_match"), completions,
                                                     repeated), np.float32)
  half_N = np.asarray(rewards_lib.call_reward_func(half_reward, completions, repeated), np.float32)
  np.testing.assert_array_equal(np.asarray(per_func_BxGxF)[..., 0].reshape(-1), strict_N)
  np.testing.assert_array_equal(np.asarray(per_func_BxGxF)[..., 1].reshape(-1), half_N)
  np.testing.assert_allclose(np.asarray(rewards_BxG).reshape(-1), strict_N + 2 * half_N, rtol=1e-6)
  metrics = scoring.reward_func_metrics(per_func_BxGxF, funcs.names)
  assert set(metrics) == {f"rewards/{n}/{s}" for n in funcs.names for s in ("mean", "std")}
  np.testing.assert_allclose(float(metrics["rewards/strict_match/mean"]), strict_N.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["rewards/strict_match/std"]), strict_N.std(ddof=1), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/half_reward_1/mean"]), half_N.mean(), rtol=1e-6)
