"""A closing tag of several tokens trains end to end (issue 18, item 4).

The tokenizer here is the synthetic word-level vocabulary without a `</think>` token: WordPiece writes the tag as two
tokens `</` `##think>` (and decodes them back to `</think>`). Budget forcing must feed both, the gold answer must start
after both, the teacher-forced weight must splice both, and a run must train on it. Each check would fail if the tag
were treated as one token (`close_tag_ids` of length 1).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from transformers import PreTrainedTokenizerFast

from tests.test_train_step import EOS, PAD, _rollout
from tsallis_jax.data import prompts, synthetic
from tsallis_jax.model import ModelConfig, Transformer, make_attention_mask, make_positions
from tsallis_jax.train import loop, tasks, train_and_evaluate
from tsallis_jax.train.config import load_config
from tsallis_jax.train.step import TokenIds, teacher_forced_scores
from tsallis_jax.train.writers import read_metrics


def two_token_tag_tokenizer():
  """The synthetic vocabulary with `</think>` replaced by the two word pieces `</` and `##think>`."""
  words = [w for w in synthetic.vocabulary() if w != "</think>"] + ["</", "##think>"]
  raw = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab={w: i for i, w in enumerate(words)},
                                                         unk_token="<unk>"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  raw.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
  raw.add_special_tokens(["<pad>", "<eos>", "<unk>", "<think>"])
  return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                 additional_special_tokens=["<think>"])


def _task(cfg):
  tok = two_token_tag_tokenizer()
  return tasks.make_task(cfg, *tasks._synthetic_splits(cfg, tok))


def test_the_tag_is_two_tokens_and_the_gold_answer_starts_after_both():
  tok = two_token_tag_tokenizer()
  tag = prompts.close_tag_ids(tok)
  assert tag == tuple(tok.convert_tokens_to_ids(["</", "##think>"])) and len(tag) == 2
  assert tok.decode(list(tag)) == "</think>"
  task = _task(load_config("smoke"))
  assert task.close_tag_ids == tag
  record = task.train[0]
  answer = prompts.gold_answer_ids(record, tok)
  assert answer == tok(record.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  assert not set(tag) & set(answer)  # a one-token tag would leave `##think>` at the answer's start
  ids, loss_mask = prompts.sft_example(record, tok)
  assert ids[-len(answer) - 2:-len(answer)] == list(tag) and ids[-len(answer):] == answer
  assert len(ids) == len(loss_mask)


def test_teacher_forced_weight_splices_the_whole_tag():
  """log w of a row that hit no stop and never closed (the tag is spliced in) equals the hand-computed log
  p(y* | x, z, `</` `##think>`) of one forward over [prompt, rationale, both tag tokens, gold answer]."""
  t1, t2 = 30, 31
  model = Transformer(ModelConfig.tiny(vocab_size=32, num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2,
                                       num_kv_heads=2), rngs=nnx.Rngs(0))
  tokens = np.array([[7, 8, 7, PAD, PAD, PAD, PAD, PAD]])
  r = _rollout(tokens, np.array([3]), np.array([3]), np.array([False]), np.zeros_like(tokens, bool))
  gold = jnp.asarray([[5, EOS, PAD]], jnp.int32)
  gold_mask = jnp.asarray([[1, 1, 0]], bool)
  ids = TokenIds(stop_ids=(EOS,), pad_id=PAD, close_tag_ids=(t1, t2))
  logp_z, logw = teacher_forced_scores(model, r, gold, gold_mask, ids)

  seq = jnp.asarray([[9, 9, 7, 8, 7, t1, t2, 5, EOS]], jnp.int32)
  pad = jnp.ones(seq.shape, bool)
  logits, _ = model(seq, make_positions(pad), make_attention_mask(pad))
  logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
  by_hand_w = logp[6, 5] + logp[7, EOS]  # the token at position i is predicted by the logits at i - 1
  by_hand_z = logp[1, 7] + logp[2, 8] + logp[3, 7]
  np.testing.assert_allclose(float(logw[0]), float(by_hand_w), rtol=1e-5)
  np.testing.assert_allclose(float(logp_z[0]), float(by_hand_z), rtol=1e-5)
  _, logw_one = teacher_forced_scores(model, r, gold, gold_mask, TokenIds(stop_ids=(EOS,), pad_id=PAD,
                                                                           close_tag_ids=(t1,)))
  assert abs(float(logw_one[0]) - float(by_hand_w)) > 1e-3  # the check tells a one-token tag apart


def test_a_run_with_a_two_token_tag_forces_both_tokens_and_trains(tmp_path):
  cfg = load_config("smoke", ["num_steps=2", "eval_every=2", "checkpoint_every=2"])
  task = _task(cfg)
  tag = task.close_tag_ids
  s, _ = loop.setup(cfg, task)
  assert s.ids.close_tag_ids == tag
  # The rollout: every closed row ends its rationale with both tag tokens (forced at the budget, or sampled).
  records = task.train[:cfg.batch_size]
  from tsallis_jax.train import evaluate as eval_lib
  tokens_BxP, mask_BxP = eval_lib.prompt_arrays(records, task.tokenizer, style=cfg.prompt_style,
                                                max_prompt_len=cfg.max_prompt_len, pad_id=task.pad_id)
  rollout = jax.device_get(s.programs.train_rollout(loop.initial_params(s), tokens_BxP, mask_BxP,
                                                    jax.random.key(0)))
  assert rollout.tokens_NxT.shape[1] == cfg.rollout_len(2)
  closed = np.flatnonzero(rollout.closed_N)
  assert closed.size and rollout.forced_N.any()
  for n in closed:
    start = int(rollout.answer_start_N[n])
    assert tuple(rollout.tokens_NxT[n, start - 2:start]) == tag
  for n in np.flatnonzero(rollout.forced_N):  # a forced row: the rationale budget, then both tag tokens
    assert int(rollout.answer_start_N[n]) == cfg.rationale_budget + 2

  results = train_and_evaluate(cfg, str(tmp_path), task=task)
  rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  assert all(np.isfinite(v) for r in train_rows for v in r.values() if isinstance(v, float))
  assert any(r["weight/mean"] > 0 for r in train_rows)  # answered rows get a weight after the spliced tag
  assert 0.0 <= results["test/p@1"] <= 1.0
  samples = read_metrics(os.path.join(tmp_path, "completions.jsonl"))
  assert any("</think>" in r["completion"] for r in samples)  # the two tokens decode to the tag the reward reads
  with open(os.path.join(tmp_path, "results.json")) as f:
    assert json.load(f)["steps"] == 2
