"""train_and_evaluate end to end on the smoke config (8 fake devices): files, metric names, best checkpoint,
the start-up precedence rule, and the NaN stop."""
import json
import os

import numpy as np
import pytest

from tsallis_jax.train import NonFiniteLossError, load_config, loop, train_and_evaluate
from tsallis_jax.train.writers import read_metrics

TRAIN_KEYS = ("loss", "reward", "reward_std", "groups/frac_all_wrong", "frac_reward_zero_std", "weight/mean",
              "jq/q", "jq/amp_mean", "jq/amp_max", "jq/weight_ess", "jq/max_c_over_Mq", "entropy", "kl",
              "mismatch/logp_abs_diff", "completions/mean_length", "completions/clipped_ratio", "grad_norm",
              "learning_rate", "perf/tokens_per_s")


_OBSERVED = []  # (step, sum of the embedding) of every observe() call of the smoke run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  cfg = load_config("smoke", ["num_steps=4", "eval_every=2", "checkpoint_every=2"])
  results = train_and_evaluate(cfg, workdir, observe=lambda step, params: _OBSERVED.append(
      (step, float(np.asarray(params["embed"]).sum()))))
  return cfg, workdir, results


def test_run_writes_metrics_checkpoints_and_results(smoke_run):
  cfg, workdir, results = smoke_run
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  for r in train_rows:
    missing = [k for k in TRAIN_KEYS if k not in r]
    assert not missing, missing
    assert all(np.isfinite(v) for k, v in r.items() if isinstance(v, float))
  assert train_rows[0]["kl"] == 0.0 and train_rows[-1]["kl"] > 0.0  # first step is on the initial policy
  eval_rows = [r for r in rows if "eval/maj@4" in r]
  assert [r["step"] for r in eval_rows] == [0, 2, 4]  # eval_at_start: the initial model is a candidate
  best_step = max(eval_rows, key=lambda r: (r["eval/maj@4"], -r["step"]))["step"]
  assert results["best"]["step"] == best_step
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == [str(best_step)]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  completions = read_metrics(os.path.join(workdir, "completions.jsonl"))
  assert sorted({(r["step"], r["split"]) for r in completions}) == [(0, "eval"), (2, "eval"), (4, "eval"),
                                                                     (4, "test")]
  assert all(r["reward"] in (0.0, 1.0) and isinstance(r["completion"], str) for r in completions)
  for k in ("test/p@1", "test/pass@4", "test/maj@4"):
    assert 0.0 <= results[k] <= 1.0
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  assert os.listdir(os.path.join(workdir, "tb"))


def test_observe_sees_the_start_and_every_step(smoke_run):
  steps = [step for step, _ in _OBSERVED]
  assert steps == [0, 1, 2, 3, 4]
  sums = [total for _, total in _OBSERVED]
  assert len(set(sums)) == 5, "each call gets the params after that step, not a stale copy"


def test_workdir_checkpoint_wins_over_init_checkpoint(smoke_run, tmp_path, capsys):
  cfg, workdir, results = smoke_run
  # The run folder holds step 4 = num_steps: the run resumes there (nothing left to train) and ignores a bogus
  # init_checkpoint, which would raise FileNotFoundError if it were read.
  again = train_and_evaluate(cfg.replace(init_checkpoint=str(tmp_path / "does_not_exist")), workdir)
  assert again == results
  assert f"resumed from step 4 of {workdir}\n" in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="init_checkpoint"):
    train_and_evaluate(cfg.replace(init_checkpoint=str(tmp_path / "does_not_exist")), str(tmp_path / "fresh"))


def test_programs_are_passed_in_explicitly_and_checked(smoke_run, tmp_path):
  """A run can use the programs of another run's setup (the demo's way of compiling once per estimator): the
  resumed smoke run evaluates with them to the same results; programs of another estimator are refused."""
  cfg, workdir, results = smoke_run
  programs = loop.setup(cfg.replace(seed=7, q=0.25))[0].programs
  assert train_and_evaluate(cfg, workdir, programs=programs) == results
  with pytest.raises(ValueError, match=r"config keys \['estimator'\] differ"):
    train_and_evaluate(cfg.replace(estimator="paft"), str(tmp_path / "other"), programs=programs)


def test_non_finite_loss_stops_with_step_batch_and_last_good_checkpoint(tmp_path):
  # lr 1e30: step 1 is finite, its update sends every parameter to ~1e30, so step 2's forward overflows.
  cfg = load_config("smoke", ["learning_rate=1e30", "num_steps=4", "checkpoint_every=1", "eval_every=0"])
  with pytest.raises(NonFiniteLossError, match=r"in the update to step 2 \(batch record ids \[.*\]\); last good "
                                               r"checkpoint: step 1 in .*checkpoints"):
    train_and_evaluate(cfg, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]  # the bad state was never saved


def test_think_tokens_are_added_with_mean_embeddings():
  import jax.numpy as jnp
  import tokenizers
  from flax import nnx
  from transformers import PreTrainedTokenizerFast

  from tsallis_jax.model import ModelConfig, Transformer
  from tsallis_jax.model.build import with_think_tokens
  vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "a", "b"])}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>")
  model = Transformer(ModelConfig.tiny(vocab_size=4), rngs=nnx.Rngs(0))
  grown, tok = with_think_tokens(model, tok, None)
  assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [4, 5]
  assert grown.config.vocab_size == 6
  embed = np.asarray(grown.embed[...])
  np.testing.assert_array_equal(embed[:4], np.asarray(model.embed[...]))
  np.testing.assert_allclose(embed[4:], np.repeat(embed[:4].mean(0, keepdims=True), 2, axis=0), rtol=1e-6)
  same, _ = with_think_tokens(grown, tok, None)  # already present: unchanged
  assert same is grown
