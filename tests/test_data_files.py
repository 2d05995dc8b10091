"""The generic task (`task="file"`): JSONL / JSON / CSV / Parquet / `datasets` sources, the column mapping, splits,
malformed rows named by file and line, prompt templates and the chat-template switch; the paper's datasets through
their TFDS builders."""
import csv
import json
import os
import re
import sys
import types

import pytest

from fixtures.chat_tokenizer import qwen3_like_tokenizer
from tsallis_jax.data import files, prompts
from tsallis_jax.data.records import Record, RecordError
from tsallis_jax.errors import InputError
from tsallis_jax.train import tasks
from tsallis_jax.train.config import ConfigError, TrainConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
COLUMNS = "question=q,answer=a,aliases=alts,context=ctx"
ROWS = [{"q": f"What is {i} plus one?", "a": i + 1, "alts": [f"{i + 1}.0"], "ctx": f"note {i}", "topic": "sums"}
        for i in range(10)]


def _write(path, rows):
  ext = os.path.splitext(path)[1]
  if ext == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif ext == ".json":
    path.write_text(json.dumps(rows))
  elif ext == ".csv":
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def _task(tmp_path, options, **keys):
  keys = {"data_columns": COLUMNS, **keys}
  cfg = TrainConfig(task="file", task_options=options, data_dir=str(tmp_path), **keys)
  return tasks.build_task(cfg, qwen3_like_tokenizer())


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_gives_the_same_records(tmp_path, ext):
  _write(tmp_path / f"train{ext}", ROWS)
  task = _task(tmp_path, f"train=train{ext}")
  r = task.train[3]
  assert (r.id, r.question, r.answer, r.aliases) == (f"train{ext}:3", "What is 3 plus one?", "4", ("4.0",))
  assert r.context[0].text == "note 3" and dict(r.columns) == {"topic": "sums"}
  assert r.where() == f"train{ext}, record 3 (id 'train{ext}:3')"
  assert len(task.train) == 10 and task.val == [] and task.test == []


def test_split_fractions_and_split_column(tmp_path):
  _write(tmp_path / "all.jsonl", ROWS)
  task = _task(tmp_path, "train=all.jsonl,val_frac=0.2,test_frac=0.3")
  assert (len(task.train), len(task.val), len(task.test)) == (5, 2, 3)
  ids = [r.id for r in task.train + task.val + task.test]
  assert sorted(ids) == sorted(f"all.jsonl:{i}" for i in range(10))
  assert [r.id for r in _task(tmp_path, "train=all.jsonl,val_frac=0.2,test_frac=0.3").val] == [r.id for r in task.val]
  parts = ["train"] * 6 + ["validation", "dev", "test", "test"]
  _write(tmp_path / "split.jsonl", [dict(r, part=p) for r, p in zip(ROWS, parts)])
  task = _task(tmp_path, "train=split.jsonl", data_columns=COLUMNS + ",split=part")
  assert (len(task.train), len(task.val), len(task.test)) == (6, 2, 2)
  _write(tmp_path / "val.jsonl", ROWS[:2])
  task = _task(tmp_path, "train=all.jsonl,val=val.jsonl")
  assert [r.source for r in task.val] == ["val.jsonl"] * 2


@pytest.mark.parametrize("ext,text,where", [
    (".jsonl", '{"q": "a?", "a": "b"}\n\n{"q": "c?"}\n', "t.jsonl, line 3: missing column 'a' (answer)"),
    (".jsonl", '{"q": "a?", "a": "b"}\n{"q": \n', "t.jsonl, line 2: not valid JSON"),
    (".csv", 'q,a\n"a?",b\n"c?",\n', "t.csv, line 3: column 'a' (answer) should be non-empty"),
    (".csv", 'q,a\n"a?",b,extra\n', "t.csv, line 2: 2 header columns but a different number of cells"),
    (".json", '[{"q": "a?", "a": "b"}, ["c?"]]', "t.json, record 1: expected an object"),
])
def test_malformed_row_names_file_and_line(tmp_path, ext, text, where):
  (tmp_path / f"t{ext}").write_text(text)
  with pytest.raises(RecordError, match="^" + re.escape(where)) as e:
    _task(tmp_path, f"train=t{ext}")
  assert isinstance(e.value, InputError)


def test_prompt_template_format_and_jinja(tmp_path):
  _write(tmp_path / "t.jsonl", ROWS)
  tok_task = _task(tmp_path, "train=t.jsonl", prompt_style="warm", prompt_template="[{topic}] {context}\nQ: {question}")
  r = tok_task.train[1]
  assert prompts.user_message(r, "warm", "note 1") == "[sums] note 1\nQ: What is 1 plus one?"
  assert prompts.render_prompt(r, tok_task.tokenizer, style="warm", context_text="note 1").startswith(
      "<|im_start|>user\n[sums] note 1")
  jinja = _task(tmp_path, "train=t.jsonl", prompt_style="warm",
                prompt_template="jinja:{{ question | upper }}{% if context %} ({{ context }}){% endif %}")
  assert prompts.user_message(jinja.train[1], "warm", "") == "WHAT IS 1 PLUS ONE?"
  assert prompts.user_message(jinja.train[1], "warm", "c") == "WHAT IS 1 PLUS ONE? (c)"
  for template in ("{nope} {question}", "jinja:{{ nope }}"):
    with pytest.raises(ConfigError, match="nope"):
      _task(tmp_path, "train=t.jsonl", prompt_style="warm", prompt_template=template)
  with pytest.raises(ConfigError, match="prompt_style=warm"):
    TrainConfig(prompt_template="{question}")
  # The paper's datasets take the same template (one construction path): the fixture task here.
  cfg = TrainConfig(task="fixture", prompt_style="warm", prompt_template="Q: {question} A:")
  fixture = tasks.build_task(cfg, qwen3_like_tokenizer())
  assert prompts.user_message(fixture.val[0], "warm", "") == "Q: What is the capital of France? A:"


def test_chat_template_switch(tmp_path):
  _write(tmp_path / "t.jsonl", ROWS)
  off = _task(tmp_path, "train=t.jsonl", chat_template="off")
  assert prompts.render_prompt(off.train[0], off.tokenizer, style="cold", context_text="") == \
      "What is 0 plus one? <think>"
  assert prompts.gold_answer_ids(off.train[0], off.tokenizer)[-1] == off.tokenizer.eos_token_id
  with pytest.raises(ConfigError, match="no chat template"):
    tasks.make_task(TrainConfig(chat_template="on"), off.tokenizer, {"train": [], "val": [], "test": []}, {})
  with pytest.raises(ConfigError, match="chat_template"):
    TrainConfig(chat_template="maybe")


def test_datasets_source_through_load_dataset(tmp_path, monkeypatch):
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    return ROWS[:4] if split == "train" else ROWS[4:6]

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  task = _task(tmp_path, "train=hf:org/qa,test=hf:org/qa@validation,hf_config=main")
  assert calls == [("org/qa", "main", "train"), ("org/qa", "main", "validation")]
  assert (len(task.train), len(task.test)) == (4, 2) and task.test[0].where().startswith("org/qa[validation], rec")
  with pytest.raises(RecordError, match=r"^org/qa\[train\], row 0: missing column 'q'"):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: [{"x": 1}]))
    _task(tmp_path, "train=hf:org/qa")


def test_file_task_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="needs task_options train=PATH"):
    _task(tmp_path, "")
  with pytest.raises(ConfigError, match="role 'title' is unknown"):
    _task(tmp_path, "train=t.jsonl", data_columns="title=t")
  with pytest.raises(InputError, match="does not exist"):
    _task(tmp_path, "train=missing.jsonl")


@pytest.mark.parametrize("dataset", ["hotpotqa"])
def test_paper_dataset_through_tfds_builder_equals_files(tmp_path, dataset):
  options = "train=-1,val=2,test=1"
  cfg = TrainConfig(task=dataset, data_dir=os.path.join(FIXTURES, dataset),
                    task_options=f"{options},tfds_dir={tmp_path}")
  via_tfds = tasks.build_task(cfg, qwen3_like_tokenizer())
  via_files = tasks.build_task(cfg.replace(task_options=f"{options},reader=files"), qwen3_like_tokenizer())
  assert via_tfds.info["reader"] == "tfds" and os.listdir(tmp_path)
  for split in ("train", "val", "test"):
    assert getattr(via_tfds, split) == getattr(via_files, split) and getattr(via_tfds, split)


def test_record_json_round_trip_keeps_columns_and_template():
  r = Record(id="x", question="q?", answer="a", columns=(("topic", "t"),), template="{topic}")
  assert Record.from_json(r.to_json()) == r
  old = json.loads(r.to_json())
  del old["columns"], old["template"]
  assert Record.from_json(json.dumps(old)) == Record(id="x", question="q?", answer="a")
