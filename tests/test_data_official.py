"""Readers of the official files (on hand-written fixtures), malformed records, the FinQA executor, splits, TFDS."""
import json
import logging
import os
import shutil

import pytest

from tsallis_jax import rewards
from tsallis_jax.data import builders, finqa_program, official, splits
from tsallis_jax.data.records import Record, RecordError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SMALL = {"finqa": {"train": None, "validation": None, "test": None},
         "hotpotqa": {"train": None, "validation": 2, "test": 1},
         "musique": {"train": None, "validation": 1, "test": 1}}


def _path(dataset, name):
  return os.path.join(FIXTURES, dataset, name)


def test_finqa_reader_fields():
  recs = official.read_official("finqa", _path("finqa", "train.json"))
  assert [r.index for r in recs] == [0, 1, 2]
  r = recs[0]
  assert r.id == "FIXTURE/2016/page_1.pdf-1" and r.answer == "25%" and r.aliases == ("0.25",)
  assert r.table[1] == ("net revenue", "$ 1,250", "$ 1,000")
  assert r.program == "subtract(1250, 1000), divide(#0, 1000)" and r.source == "train.json"
  assert r.context[0].sentences[1] == "amounts are in millions ."
  yes = official.read_official("finqa", _path("finqa", "dev.json"))[0]
  assert yes.answer == "yes" and yes.aliases == ()


@pytest.mark.parametrize("name", ["train.json", "dev.json", "test.json"])
def test_finqa_executor_reproduces_exe_ans(name):
  raws = json.load(open(_path("finqa", name)))
  for raw in raws:
    try:
      value = finqa_program.execute(raw["qa"]["program"], raw["table"])
    except ValueError as e:  # a `( 20 )` cell: invalid under the official rule, the accounting reading gives exe_ans
      assert "not a number under the official rule" in str(e), raw["id"]
      value = finqa_program.execute(raw["qa"]["program"], raw["table"], table_cells="accounting")
    assert finqa_program.matches_exe_ans(value, raw["qa"]["exe_ans"]), raw["id"]
    # The executed value, as a prediction, matches the annotators' answer string under the numeric match.
    prediction = official.format_number(value) if isinstance(value, float) else value
    assert rewards.numeric_match(prediction, raw["qa"]["answer"]), raw["id"]


def test_finqa_executor_official_table_rule():
  """evaluate.py's `process_row`: `$` dropped, text from `(` on dropped, `%` / 100, any other cell invalidates."""
  table = [["", "2019", "2018"], ["revenue", "$ 1,250", "123 ( 45 )"], ["margin", "12.5%", "10 %"],
           ["cash ( used in ) operations", "( 40 )", "10"], ["blank", "5", ""], ["Net Income", "7", "3"]]
  assert finqa_program.execute("table_sum(revenue, none)", table) == 1373.0  # `123 ( 45 )` reads 123
  assert finqa_program.execute("table_max(margin, none)", table) == 0.125
  for row in ("cash ( used in ) operations", "blank"):  # `( 40 )` and an empty cell: invalid, not skipped
    with pytest.raises(ValueError, match="not a number under the official rule"):
      finqa_program.execute(f"table_sum({row}, none)", table)
  with pytest.raises(ValueError, match="not in the table"):  # the row name matches exactly
    finqa_program.execute("table_sum(net income, none)", table)
  assert finqa_program.execute("table_average(Net Income, none)", table) == 5.0
  # The accounting reading: `( x )` negative, non-numeric cells skipped, row names case- and space-insensitive.
  acc = dict(table_cells="accounting")
  assert finqa_program.execute("table_sum(cash ( used in ) operations, none)", table, **acc) == -30.0
  assert finqa_program.execute("table_sum(blank, none)", table, **acc) == 5.0
  assert finqa_program.execute("table_sum(net  income, none)", table, **acc) == 10.0
  assert finqa_program.execute("table_sum(revenue, none)", table, **acc) == 1250.0  # `123 ( 45 )` is skipped


def test_finqa_executor_documented_differences_from_official():
  # (1) exe_ans is rounded too, and yes/no compare case-insensitively.
  assert finqa_program.matches_exe_ans(0.333333, 0.3333333) and finqa_program.matches_exe_ans("Yes", "yes")
  # (2) literals: `$` and `( x )` accepted (official: invalid); const_mN and const_N_M (official: only const_m1).
  assert finqa_program.execute("add($ 5, ( 2 ))") == 3.0
  assert finqa_program.execute("add(const_m2, const_1_5)") == -0.5
  # (3) row names with `, ` or parentheses are parsed as one argument.
  assert finqa_program.execute("table_sum(cash, net, none)", [["cash, net", "1", "2"]]) == 3.0
  # (4) a table operation on a step result is invalid.
  with pytest.raises(ValueError, match="not in the table"):
    finqa_program.execute("add(1, 2), table_max(#0, none)", [["a", "1"]])


def test_finqa_executor_rules_and_errors():
  table = [["", "2019"], ["cash ( used in ) operations", "( 40 )"], ["margin", "12.5%"]]
  assert finqa_program.execute("table_sum(cash ( used in ) operations, none)", table,
                               table_cells="accounting") == -40.0
  assert finqa_program.execute("table_max(margin, none), multiply(#0, const_m1)", table) == -0.125
  assert finqa_program.execute("divide(const_1, const_3)") == 0.33333
  assert finqa_program.execute("greater(5%, 0.04)") == "yes"
  with pytest.raises(ValueError, match="not an earlier step"):
    finqa_program.execute("add(#1, 2), add(1, 1)")
  with pytest.raises(ValueError, match="unknown operation"):
    finqa_program.execute("modulo(3, 2)")
  with pytest.raises(ValueError, match="not in the table"):
    finqa_program.execute("table_sum(revenue, none)", table)
  with pytest.raises(ValueError, match="divides by zero"):
    finqa_program.execute("divide(1, 0)")


def test_hotpotqa_reader_fields():
  recs = official.read_official("hotpotqa", _path("hotpotqa", "hotpot_dev_distractor_v1.json"))
  assert [r.answer for r in recs] == ["yes", "the River Ousel", "no"]
  r = recs[0]
  assert r.supporting_facts == (("Alder Lake", 0), ("Birch Pond", 1))
  assert r.context[1].title == "Birch Pond" and len(r.context[1].sentences) == 2


def test_musique_reader_aliases_and_unanswerable():
  ans = official.read_official("musique", _path("musique", "musique_ans_v1.0_dev.jsonl"))
  assert ans[0].answers == ("Thomas Vell", "T. Vell", "Tom Vell")
  assert ans[0].supporting_facts == (("Grey Morning (paint)", 0), ("Vell & Sons", 2))
  assert ans[1].answer == "2.5%"
  full = official.read_official("musique", _path("musique", "musique_full_v1.0_dev.jsonl"))
  assert [r.answerable for r in full] == [False, True]


def _write_broken(tmp_path, dataset, name, index, mutate):
  path = _path(dataset, name)
  if name.endswith(".jsonl"):
    raws = [json.loads(line) for line in open(path)]
  else:
    raws = json.load(open(path))
  mutate(raws[index])
  out = tmp_path / name
  if name.endswith(".jsonl"):
    out.write_text("".join(json.dumps(r) + "\n" for r in raws))
  else:
    out.write_text(json.dumps(raws))
  return str(out)


@pytest.mark.parametrize("dataset, name, index, field, rid", [
    ("finqa", "train.json", 1, "pre_text", "FIXTURE/2016/page_1.pdf-2"),
    ("hotpotqa", "hotpot_dev_distractor_v1.json", 2, "supporting_facts", "fixture-hp-dev-3"),
    ("musique", "musique_ans_v1.0_dev.jsonl", 1, "answer_aliases", "3hop1__fixture_2"),
])
def test_malformed_record_names_file_index_id_field(tmp_path, dataset, name, index, field, rid):
  path = _write_broken(tmp_path, dataset, name, index, lambda raw: raw.pop(field))
  with pytest.raises(RecordError) as err:
    official.read_official(dataset, path)
  message = str(err.value)
  assert name in message and f"record {index}" in message and rid in message and repr(field) in message


def test_malformed_nested_field_and_skip_is_counted(tmp_path, caplog):
  path = _write_broken(tmp_path, "finqa", "dev.json", 0, lambda raw: raw["qa"].pop("exe_ans"))
  with pytest.raises(RecordError, match=r"dev.json \[qa\], record 0 .*'exe_ans'"):
    official.read_official("finqa", path)
  with caplog.at_level(logging.WARNING):
    recs, skipped = official.read_official("finqa", path, on_error="skip", return_skipped=True)
  assert skipped == 1 and [r.index for r in recs] == [1]
  assert "skipped 1 malformed record(s) of 2" in caplog.text


def test_record_json_round_trip():
  for dataset, name in [("finqa", "train.json"), ("hotpotqa", "hotpot_train_v1.1.json"),
                        ("musique", "musique_ans_v1.0_dev.jsonl")]:
    for r in official.read_official(dataset, _path(dataset, name)):
      assert Record.from_json(r.to_json()) == r


def test_splits_deterministic_disjoint_and_seeded():
  a = splits.paper_splits("hotpotqa", os.path.join(FIXTURES, "hotpotqa"), seed=0, sizes=SMALL["hotpotqa"])
  b = splits.paper_splits("hotpotqa", os.path.join(FIXTURES, "hotpotqa"), seed=0, sizes=SMALL["hotpotqa"])
  assert a == b
  assert {r.id for r in a["validation"]}.isdisjoint({r.id for r in a["test"]})
  assert len(a["validation"]) == 2 and len(a["test"]) == 1 and len(a["train"]) == 2
  orders = {tuple(r.id for r in splits.paper_splits("hotpotqa", os.path.join(FIXTURES, "hotpotqa"), seed=s,
                                                    sizes=SMALL["hotpotqa"])["validation"]) for s in range(8)}
  assert len(orders) > 1  # the seed matters
  with pytest.raises(ValueError, match="validation: 4 records requested"):
    splits.paper_splits("hotpotqa", os.path.join(FIXTURES, "hotpotqa"), sizes={"train": 1, "validation": 4, "test": 0})


def test_splits_drop_unanswerable_with_a_count(tmp_path, caplog):
  for name in ("musique_ans_v1.0_train.jsonl", "musique_ans_v1.0_dev.jsonl"):
    shutil.copy(_path("musique", name), tmp_path / name)
  shutil.copy(_path("musique", "musique_full_v1.0_dev.jsonl"), tmp_path / "musique_ans_v1.0_dev.jsonl")
  with caplog.at_level(logging.INFO):
    out = splits.paper_splits("musique", str(tmp_path), sizes={"train": None, "validation": 1, "test": 0})
  assert [r.answerable for r in out["validation"]] == [True]
  assert "dropped 1 unanswerable record(s) of 2" in caplog.text


def test_missing_files_error_has_instructions(tmp_path):
  with pytest.raises(FileNotFoundError, match="hotpot_train_v1.1.json.*hotpotqa.github.io"):
    splits.paper_splits("hotpotqa", str(tmp_path))


@pytest.mark.parametrize("dataset", ["finqa", "hotpotqa", "musique"])
def test_tfds_builder_round_trip_without_tensorflow(tmp_path, dataset):
  import sys
  config = builders.SplitConfig(name="fixture", seed=0, sizes=SMALL[dataset])
  builder = builders.prepare(dataset, os.path.join(FIXTURES, dataset), str(tmp_path), config=config)
  plain = splits.paper_splits(dataset, os.path.join(FIXTURES, dataset), seed=0, sizes=SMALL[dataset])
  for split in splits.SPLITS:
    assert builders.load_split(builder, split) == plain[split]
  assert "tensorflow" not in sys.modules
  assert builders.BUILDERS[dataset].MANUAL_DOWNLOAD_INSTRUCTIONS


def test_tfds_builder_missing_folder_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="train.json"):
    builders.prepare("finqa", str(tmp_path), str(tmp_path / "out"))


def test_load_split_by_name(tmp_path):
  # The paper's sizes need the full files; with the fixtures the request is too large and says so.
  with pytest.raises(ValueError, match="6145 records requested"):
    splits.load_split("finqa", "train", data_dir=os.path.join(FIXTURES, "finqa"))
  with pytest.raises(ValueError, match="unknown split"):
    splits.load_split("finqa", "holdout", data_dir=os.path.join(FIXTURES, "finqa"))
  folder = os.path.join(FIXTURES, "musique")
  want = splits.paper_splits("musique", folder, seed=3, sizes=SMALL["musique"])
  for name, split in [("train", "train"), ("val", "validation"), ("test", "test")]:
    assert splits.load_split("musique", name, data_dir=folder, seed=3, sizes=SMALL["musique"]) == want[split]
