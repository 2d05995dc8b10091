"""Synthetic chain tasks: gold answers recomputed independently, the p0 knob, the tokenizer round trip."""
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from tsallis_jax.data import prompts, synthetic


def _recompute(question: str, modulus: int) -> list[int]:
  # Independent re-implementation from the question words, not via synthetic.solve.
  words = question.split()
  assert words[1] == "start"
  v, partials = int(words[2]), []
  for op, x in zip(words[3::2], words[4::2]):
    v = {"add": v + int(x), "sub": v - int(x), "mul": v * int(x)}[op] % modulus
    partials.append(v)
  return partials


@pytest.mark.parametrize("p0", [1e-1, 1e-2, 1e-3, 1e-4])
def test_target_task_p0_knob(p0):
  task = synthetic.target_task(p0)
  assert task.nominal_p0 == pytest.approx(p0)
  assert task.answer_len == round(-math.log10(p0))
  mapped = {task.map_value(v) for v in range(task.modulus)}
  assert mapped == set(range(task.modulus)), "the answer map must be a permutation"
  assert any(task.map_value(v) != v for v in range(task.modulus)), "the target map must differ from the source's"


def test_p0_1e4_with_three_answer_words():
  task = synthetic.target_task(1e-4, modulus=22)
  assert task.answer_len == 3 and task.nominal_p0 == pytest.approx(22.0 ** -3)


def test_records_answers_and_rationales_are_correct():
  task = synthetic.ChainTask(name="target", modulus=7, num_steps=5, answer_len=2, answer_map=(3, 2))
  records = synthetic.make_records(task, 40, seed=3)
  assert len({r.id for r in records}) == 40
  for r in records:
    partials = _recompute(r.question, 7)
    assert r.answer.split() == [str((3 * v + 2) % 7) for v in partials[-2:]]
    assert [int(w) for w in r.rationale.split()[3::4]] == partials
    assert r.rationale.split()[2::4] == ["="] * 5


def test_records_are_deterministic_in_the_seed():
  task = synthetic.target_task(1e-2)
  assert synthetic.make_records(task, 5, 0) == synthetic.make_records(task, 5, 0)
  assert synthetic.make_records(task, 5, 0) != synthetic.make_records(task, 5, 1)


def test_pretraining_mix_hides_the_target_map():
  target = synthetic.ChainTask(name="target", modulus=5, num_steps=4, answer_len=2, answer_map=(2, 1))
  source = synthetic.source_task(target)
  mix = synthetic.pretraining_records(source, target, 400, seed=0, target_fraction=0.5)
  target_recs = [r for r in mix if r.question.startswith("target")]
  source_recs = [r for r in mix if r.question.startswith("source")]
  assert len(target_recs) == 200 and len(source_recs) == 200
  for r in source_recs:
    assert r.answer.split() == [str(v) for v in _recompute(r.question, 5)[-2:]]
  # Random target answers: about 1/25 match the gold map by chance, far from all of them.
  hits = sum(r.answer.split() == [str(target.map_value(v)) for v in _recompute(r.question, 5)[-2:]]
             for r in target_recs)
  assert hits < 30
  assert len({r.answer for r in target_recs}) > 15  # spread over the 25 possible answers


def test_sizes_are_tiny():
  tok = synthetic.make_tokenizer()
  task = synthetic.target_task(1e-3)
  for r in synthetic.make_records(task, 20, 0):
    ids, mask = prompts.sft_example(r, tok, style="cold")
    n_prompt = len(ids) - sum(mask)
    assert 10 <= n_prompt <= 30
    assert 10 <= sum(mask) <= 30
    assert 1 <= len(r.answer.split()) <= 3


def test_tokenizer_round_trip(tmp_path):
  tok = synthetic.make_tokenizer()
  record = synthetic.make_records(synthetic.target_task(1e-2), 1, 0)[0]
  text = f"{record.question} <think> {record.rationale} </think> {record.answer} <eos>"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.unk_token_id not in ids
  assert len(ids) == len(text.split())
  assert tok.decode(ids) == text
  tok.save_pretrained(tmp_path)
  loaded = AutoTokenizer.from_pretrained(tmp_path)
  assert loaded(text, add_special_tokens=False)["input_ids"] == ids
  for special in ("<pad>", "<eos>", "<think>", "</think>"):
    assert len(loaded(special, add_special_tokens=False)["input_ids"]) == 1
  assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"


def test_bad_task_raises():
  with pytest.raises(ValueError, match="coprime"):
    synthetic.ChainTask(modulus=10, answer_map=(2, 1))
  with pytest.raises(ValueError, match="vocabulary"):
    synthetic.ChainTask(name="unknown")
  with pytest.raises(ValueError, match="answer_len"):
    synthetic.ChainTask(num_steps=2, answer_len=3)


def test_warm_prompt_has_instructions_cold_has_none():
  tok = synthetic.make_tokenizer()
  r = synthetic.make_records(synthetic.target_task(1e-2), 1, 0)[0]
  cold, _ = prompts.prompt_ids(r, tok, style="cold", max_prompt_tokens=64)
  warm, _ = prompts.prompt_ids(r, tok, style="warm", max_prompt_tokens=64)
  assert tok.decode(cold) == r.question + " <think>"
  assert tok.decode(warm).endswith(r.question + " <think>") and len(warm) > len(cold)
  assert tok.unk_token_id not in warm
  answer = prompts.gold_answer_ids(r, tok)
  assert tok.decode(answer) == r.answer + " <eos>"
  assert np.all(np.array(answer[:-1]) != tok.eos_token_id)


def test_sft_arrays_for_pretraining():
  from tsallis_jax.data import pipeline
  tok = synthetic.make_tokenizer()
  target = synthetic.target_task(1e-2)
  recs = synthetic.pretraining_records(synthetic.source_task(target), target, 6, seed=0)
  arrays = pipeline.sft_arrays(recs, tok, seq_len=48)
  assert arrays["tokens_NxT"].shape == (6, 48)
  for row, r in enumerate(recs):
    ids = arrays["tokens_NxT"][row][arrays["mask_NxT"][row]]
    assert tok.decode(ids) == f"{r.question} <think> {r.rationale} </think> {r.answer} <eos>"
    completion = arrays["tokens_NxT"][row][arrays["loss_mask_NxT"][row]]
    assert tok.decode(completion) == f"{r.rationale} </think> {r.answer} <eos>"
  assert not np.any(arrays["loss_mask_NxT"] & ~arrays["mask_NxT"])
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.sft_arrays(recs, tok, seq_len=20)


def test_mixed_task_buckets_have_their_own_map_length_and_marker():
  mix = synthetic.mixed_task((1, 2, 3, 4))
  assert mix.buckets == ("easy", "medium", "hard", "hardest")
  assert [t.nominal_p0 for t in mix.targets] == pytest.approx([1e-1, 1e-2, 1e-3, 1e-4])
  assert len({t.answer_map for t in mix.targets}) == 4, "distinct maps: no transfer from easy to hard"
  assert len({t.name for t in mix.targets + mix.sources}) == 8
  assert all(s.answer_map == (1, 0) and s.answer_len == t.answer_len for s, t in zip(mix.sources, mix.targets))
  records = mix.records(101, seed=5)
  counts = {b: sum(r.dataset == f"synthetic/{b}" for r in records) for b in mix.buckets}
  assert counts == {"easy": 26, "medium": 25, "hard": 25, "hardest": 25}
  assert [r.index for r in records] == list(range(101)) and records == mix.records(101, seed=5)
  for r in records:  # the answer is the bucket's map of the last k partial results, recomputed independently
    task = mix.targets[mix.buckets.index(r.dataset.split("/")[1])]
    assert r.question.split()[0] == task.name
    a, c = task.answer_map
    partials = _recompute(r.question, task.modulus)
    assert r.answer.split() == [str((a * v + c) % task.modulus) for v in partials[-task.answer_len:]]
  shared = synthetic.mixed_task((1, 3), shared_map=True)
  assert shared.buckets == ("k1", "k3") and len({t.answer_map for t in shared.targets}) == 1


def test_mixed_pretraining_hides_every_target_map():
  mix = synthetic.mixed_task((1, 2, 3))
  records = mix.pretraining_records(600, seed=0)
  for task in mix.targets:
    rows = [r for r in records if r.question.split()[0] == task.name]
    assert len(rows) > 50
    hits = sum(r.answer.split() == [str(task.map_value(v)) for v in _recompute(r.question, task.modulus)
                                    [-task.answer_len:]] for r in rows)
    assert hits <= 3 * task.nominal_p0 * len(rows) + 3  # random answers: chance level, never the hidden map
  with pytest.raises(ValueError, match="answer_lens"):
    synthetic.mixed_task((1, 5), num_steps=4)
  with pytest.raises(ValueError, match="answer_lens"):
    synthetic.mixed_task(())


def test_evaluation_splits_metrics_by_bucket():
  import types

  import jax
  from tsallis_jax.train import evaluate as eval_lib
  mix = synthetic.mixed_task((1, 2, 3))
  records = mix.records(6, seed=0)
  tok = synthetic.make_tokenizer()
  G = 2

  def rollout_fn(params, prompt_BxP, mask_BxP, key):  # answers the easy prompts right and the others wrong
    rows = []
    for b in range(prompt_BxP.shape[0]):
      r = records[min(int(params["offset"]) + b, len(records) - 1)]
      answer = r.answer if r.dataset.endswith("easy") else "x"
      rows += [tok.convert_tokens_to_ids(["add", "</think>"] + answer.split() + ["<eos>"])] * G
    width = max(len(x) for x in rows)
    return types.SimpleNamespace(tokens_NxT=np.asarray([x + [0] * (width - len(x)) for x in rows]),
                                 lengths_N=np.asarray([len(x) for x in rows]))

  metrics, _ = eval_lib.evaluate(rollout_fn, {"offset": 0}, records, tok, style="cold", max_prompt_len=16, pad_id=0,
                                 batch_size=len(records), num_samples=G, key=jax.random.key(0),
                                 put=lambda arrays: arrays, reward_name="substring_match")
  assert metrics["easy/p@1"] == 1.0 and metrics["medium/p@1"] == 0.0 and metrics["hard/p@1"] == 0.0
  assert metrics["p@1"] == pytest.approx(2 / 6)
