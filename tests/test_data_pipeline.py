"""The grain prompt pipeline: seeded order, per-host slices, exact resume, padding, gold answers, truncation."""
import numpy as np
import pytest

from fixtures.chat_tokenizer import qwen3_like_tokenizer
from tsallis_jax.data import context, pipeline, prompts, synthetic
from tsallis_jax.data.records import Passage, Record


@pytest.fixture(scope="module")
def records():
  return synthetic.make_records(synthetic.target_task(1e-2), 30, seed=0)


@pytest.fixture(scope="module")
def tok():
  return synthetic.make_tokenizer()


def _loader(records, tok, **kw):
  args = dict(batch_size=4, seed=7, max_prompt_tokens=48, max_answer_tokens=6, pad_multiple=8)
  args.update(kw)
  return pipeline.make_prompt_loader(records, tok, **args)


def test_batch_contents(records, tok):
  batch = _loader(records, tok)[0]
  assert set(batch) == {"prompt_tokens_BxP", "prompt_mask_BxP", "answer_tokens_BxA", "answer_mask_BxA", "index_B"}
  b, t = batch["prompt_tokens_BxP"].shape
  assert b == 4 and t % 8 == 0 and batch["answer_tokens_BxA"].shape == (4, 6)
  for row, idx in enumerate(batch["index_B"]):
    r = records[idx]
    mask = batch["prompt_mask_BxP"][row]
    assert mask[-1] and not mask[0]  # left padded
    assert np.all(np.diff(mask.astype(int)) >= 0)
    assert tok.decode(batch["prompt_tokens_BxP"][row][mask]) == r.question + " <think>"
    amask = batch["answer_mask_BxA"][row]
    assert np.all(np.diff(amask.astype(int)) <= 0)  # right padded
    assert tok.decode(batch["answer_tokens_BxA"][row][amask]) == r.answer + " <eos>"
    assert batch["prompt_tokens_BxP"][row][~mask].tolist() == [tok.pad_token_id] * int((~mask).sum())


def test_each_epoch_is_a_permutation_reshuffled(records, tok):
  loader = _loader(records, tok, batch_size=5)
  epoch0 = np.concatenate([loader[s]["index_B"] for s in range(6)])
  epoch1 = np.concatenate([loader[s]["index_B"] for s in range(6, 12)])
  assert sorted(epoch0.tolist()) == list(range(30)) == sorted(epoch1.tolist())
  assert epoch0.tolist() != epoch1.tolist()
  assert epoch0.tolist() != list(range(30))


def test_seed_determines_order(records, tok):
  a = [_loader(records, tok, seed=1)[s]["index_B"].tolist() for s in range(3)]
  b = [_loader(records, tok, seed=1)[s]["index_B"].tolist() for s in range(3)]
  c = [_loader(records, tok, seed=2)[s]["index_B"].tolist() for s in range(3)]
  assert a == b and a != c


def test_shards_partition_the_global_batch(records, tok):
  full = _loader(records, tok, batch_size=8)
  shards = [_loader(records, tok, batch_size=8, shard_index=i, shard_count=4) for i in range(4)]
  for step in range(5):
    parts = [s[step]["index_B"] for s in shards]
    assert all(p.shape == (2,) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full[step]["index_B"])


def test_resume_at_exact_position(records, tok):
  loader = _loader(records, tok)
  it = iter(loader)
  for _ in range(9):  # crosses an epoch boundary (7 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(_loader(records, tok))  # a fresh loader, as after a restart
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_finite_epochs_stop(records, tok):
  loader = _loader(records, tok, batch_size=10, num_epochs=2)
  assert len(list(iter(loader))) == 6


def test_bad_arguments_raise(records, tok):
  with pytest.raises(ValueError, match="multiple of shard_count"):
    _loader(records, tok, batch_size=6, shard_count=4)
  with pytest.raises(ValueError, match="shard_index"):
    _loader(records, tok, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="style"):
    _loader(records, tok, style="hot")
  with pytest.raises(ValueError, match="max_answer_tokens"):
    _loader(records, tok, max_answer_tokens=2)[0]


def _hotpot_record():
  return Record(id="h1", question="Which band formed first?", answer="The Kinks", aliases=("Kinks",),
                dataset="hotpotqa",
                context=(Passage("The Kinks", ("The Kinks formed in 1963.", "They come from London.")),
                         Passage("The Who", ("The Who formed in 1964.",))))


def test_chat_template_prompt_and_gold_answer():
  tok = qwen3_like_tokenizer()
  r = _hotpot_record()
  ids, dropped = prompts.prompt_ids(r, tok, style="warm", max_prompt_tokens=10_000)
  text = tok.decode(ids)
  assert dropped == 0
  assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
  assert "Question: Which band formed first?" in text and "The Kinks: The Kinks formed in 1963." in text
  cold = tok.decode(prompts.prompt_ids(r, tok, style="cold", max_prompt_tokens=10_000)[0])
  assert "Question:" not in cold and "Reason step by step" not in cold and "The Who formed in 1964." in cold
  answer = prompts.gold_answer_ids(r, tok, style="warm")
  assert tok.decode(answer) == "\n\nThe Kinks<|im_end|>"
  assert answer[-1] == tok.eos_token_id
  # Exactly the tail of the tokenised full conversation that the model emits after </think>.
  full = tok.apply_chat_template([{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "<think>\nz\n</think>\n\nThe Kinks"}],
                                 tokenize=False)
  full_ids = tok(full, add_special_tokens=False)["input_ids"]
  close = tok.convert_tokens_to_ids("</think>")
  assert full_ids[full_ids.index(close) + 1:full_ids.index(close) + 1 + len(answer)] == answer


def test_truncation_keeps_the_longest_unit_prefix():
  tok = qwen3_like_tokenizer()
  r = _hotpot_record()
  units = context.context_units(r)
  assert len(units) == 3

  def count(k):
    text = prompts.render_prompt(r, tok, style="cold", context_text=context.join_units(units[:k]))
    return len(tok(text, add_special_tokens=False)["input_ids"])

  sizes = [count(k) for k in range(len(units) + 1)]
  assert sizes == sorted(sizes)
  for budget in range(sizes[0], sizes[-1] + 2):
    ids, dropped = prompts.prompt_ids(r, tok, style="cold", max_prompt_tokens=budget)
    kept = len(units) - dropped
    assert len(ids) == sizes[kept] <= budget
    assert kept == len(units) or sizes[kept + 1] > budget  # the longest prefix that fits
  ids, _ = prompts.prompt_ids(r, tok, style="cold", max_prompt_tokens=sizes[1])
  assert "The Kinks formed in 1963." in tok.decode(ids) and "London" not in tok.decode(ids)
  with pytest.raises(ValueError, match="without any context"):
    prompts.prompt_ids(r, tok, style="cold", max_prompt_tokens=sizes[0] - 1)


def test_chat_tokenizer_loader_batches():
  tok = qwen3_like_tokenizer()
  recs = [_hotpot_record()] * 4
  batch = pipeline.make_prompt_loader(recs, tok, batch_size=2, seed=0, style="warm", max_prompt_tokens=512,
                                      max_answer_tokens=16)[0]
  row = batch["answer_tokens_BxA"][0][batch["answer_mask_BxA"][0]]
  assert tok.decode(row) == "\n\nThe Kinks<|im_end|>"


def test_tokenizer_without_think_token_raises(records):
  import tokenizers
  from transformers import PreTrainedTokenizerFast
  plain = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<unk>": 0, "<eos>": 1}, unk_token="<unk>")), unk_token="<unk>", eos_token="<eos>")
  with pytest.raises(ValueError, match="</think>"):
    pipeline.make_prompt_loader(records, plain, batch_size=2, seed=0, max_prompt_tokens=64)


def test_finqa_linearization_order():
  from tsallis_jax.data import official
  r = official.read_official("finqa", "tests/fixtures/finqa/train.json")[0]
  lines = context.linearize(r).split("\n")
  assert lines[0] == "the following table shows selected results of the widget segment . amounts are in millions ."
  assert lines[1:4] == [" | 2016 | 2015", "net revenue | $ 1,250 | $ 1,000", "operating income | $ 300 | $ 250"]
  assert lines[4].startswith("revenue grew")
  assert context.linearize(r) == context.linearize(official.read_official("finqa", "tests/fixtures/finqa/train.json")[0])


@pytest.mark.parametrize("dataset, name", [("finqa", "dev.json"), ("hotpotqa", "hotpot_dev_distractor_v1.json"),
                                           ("musique", "musique_ans_v1.0_dev.jsonl")])
@pytest.mark.parametrize("style", ["cold", "warm"])
def test_loader_on_fixture_records(dataset, name, style):
  from tsallis_jax.data import official
  tok = qwen3_like_tokenizer()
  recs = official.read_official(dataset, f"tests/fixtures/{dataset}/{name}")
  loader = pipeline.make_prompt_loader(recs, tok, batch_size=2, seed=0, style=style, max_prompt_tokens=512,
                                       max_answer_tokens=16)
  batch = loader[0]
  for row, idx in enumerate(batch["index_B"]):
    text = tok.decode(batch["prompt_tokens_BxP"][row][batch["prompt_mask_BxP"][row]])
    assert recs[idx].question in text and (("Question: " in text) == (style == "warm"))
    answer = tok.decode(batch["answer_tokens_BxA"][row][batch["answer_mask_BxA"][row]])
    assert answer == f"\n\n{recs[idx].answer}<|im_end|>"
