"""Every shipped config loads and documents itself; unknown keys and impossible values are clear errors."""
import importlib
import pathlib

import pytest

from tsallis_jax.model.build import build_model, preset_config, typed_overrides
from tsallis_jax.train.config import (ConfigError, TrainConfig, apply_overrides, check_fits, check_mesh, model_spec,
                                      load_config)

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", NAMES)
def test_every_config_loads_and_documents_command_runtime_and_result(name):
  cfg = load_config(name)
  assert isinstance(cfg, TrainConfig)
  doc = importlib.import_module(f"experiments.configs.{name}").__doc__ or ""
  for word in ("Command", "Runtime", "Expected"):
    assert word in doc, f"experiments/configs/{name}.py's docstring lacks {word!r}"
  assert "python -m experiments." in doc


def test_overrides_parse_types_and_apply():
  cfg = apply_overrides(TrainConfig(), ["q=0.25", "estimator=paft", "num_steps=7", "tensorboard=false"])
  assert (cfg.q, cfg.estimator, cfg.num_steps, cfg.tensorboard) == (0.25, "paft", 7, False)


def test_unknown_key_names_the_key_a_suggestion_and_the_valid_keys():
  with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rat'\].*did you mean 'learning_rate'"
                     r".*Valid keys"):
    apply_overrides(TrainConfig(), ["learning_rat=1e-3"])
  with pytest.raises(ConfigError, match="unknown config key"):
    TrainConfig().replace(nonsense=1)


@pytest.mark.parametrize("override, message", [
    ("q=1.5", r"q=1.5 is outside \[0, 1\]"),
    ("q_end=-0.1", r"q_end=-0.1 is outside \[0, 1\]"),
    ("num_samples=1", "num_samples=1 < 2 with estimator='garl' and baseline=rloo"),
    ("estimator=sft", "estimator='sft' is not one of"),
    ("temperature=0", "temperature=0.0 must be > 0"),
    ("num_steps=abc", "cannot parse 'abc' as int"),
    ("warmup_steps=1000", "warmup_steps=1000 exceeds num_steps"),
    ("model_path=/x", "model_path='/x' is only read when model is 'hf' or 'gguf'"),
    ("eval_reward=bleu", "eval_reward='bleu' is not one of"),
    ("top_p=0", r"top_p=0.0 must lie in \(0, 1\]"),
    ("top_k=5", r"top_k=5, top_p=1.0: training rollouts would come from the top-k/top-p filtered policy.*set"
                r" top_k=0 and top_p=1.0"),
    ("top_p=0.9", r"top_k=0, top_p=0.9: .*biases GARL, PAFT and GRPO"),
    ("grpo_loss_type=ppo", r"grpo_loss_type='ppo' is not one of \['grpo', 'bnpo', 'dr_grpo', 'dapo', 'seq_sum'\]"),
    ("grpo_scale_rewards=std", r"grpo_scale_rewards='std' is not one of \['group', 'batch', 'none'\]"),
    ("rationale_budget=0", "rationale_budget=0: budget forcing needs at least one rationale token.*set"
                           " rationale_budget >= 1"),
    ("rollout_chunk_rows=12", "rollout_chunk_rows=12 must be a multiple of num_samples=8"),
    ("rollout_chunk_rows=64", "rollout_chunk_rows=64 must be a multiple of num_samples=8 .* and divide batch_size x"
                              " num_samples = 32 rows"),
    ("rollout_chunk_rows=-16", "rollout_chunk_rows=-16 must be >= 0"),
    ("kv_cache_dtype=int8", "kv_cache_dtype='int8' is not one of"),
])
def test_impossible_values_are_rejected_at_config_time(override, message):
  with pytest.raises(ConfigError, match=message):
    apply_overrides(TrainConfig(), [override])


def test_grpo_options_take_trls_names():
  for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
    for scale in ("group", "batch", "none"):
      cfg = apply_overrides(TrainConfig(), ["estimator=grpo", f"grpo_loss_type={loss_type}",
                                            f"grpo_scale_rewards={scale}"])
      assert (cfg.grpo_loss_type, cfg.grpo_scale_rewards) == (loss_type, scale)
  assert (TrainConfig().grpo_loss_type, TrainConfig().grpo_scale_rewards) == ("grpo", "group")


def test_evaluation_sampling_may_still_be_filtered():
  cfg = apply_overrides(TrainConfig(), ["eval_top_k=5", "eval_top_p=0.9"])
  assert (cfg.eval_top_k, cfg.eval_top_p, cfg.top_k, cfg.top_p) == (5, 0.9, 0, 1.0)


def test_grpo_needs_two_samples_and_rloo_can_be_switched_off():
  with pytest.raises(ConfigError, match="num_samples=1 < 2 with estimator='grpo'"):
    TrainConfig(estimator="grpo", num_samples=1)
  assert TrainConfig(estimator="garl", baseline="none", num_samples=1).num_samples == 1


def test_mesh_and_budget_checks():
  with pytest.raises(ConfigError, match="mesh_fsdp=3 does not divide the 8 devices"):
    check_mesh(TrainConfig(mesh_fsdp=3), 8)
  with pytest.raises(ConfigError, match="mesh_data=2 x mesh_fsdp=2 = 4 does not equal the 8 devices"):
    check_mesh(TrainConfig(mesh_data=2, mesh_fsdp=2), 8)
  with pytest.raises(ConfigError, match="batch_size=4 is not divisible by the 8 devices"):
    check_mesh(TrainConfig(batch_size=4, eval_batch_size=8), 8)
  assert check_mesh(TrainConfig(batch_size=8, eval_batch_size=8, mesh_fsdp=2), 8) == (4, 2)
  chunked = TrainConfig(batch_size=16, eval_batch_size=8, num_samples=4, eval_num_samples=4, rollout_chunk_rows=16)
  with pytest.raises(ConfigError, match="rollout_chunk_rows=16 rows hold 4 prompt\\(s\\) of 4 samples, which do not"
                                        " split over the 8 devices.*multiple of 32"):
    check_mesh(chunked, 8)
  check_mesh(chunked.replace(rollout_chunk_rows=32), 8)
  cfg = TrainConfig(max_prompt_len=2048, rationale_budget=4096 - 128, max_answer_len=128)
  with pytest.raises(ConfigError, match="exceeds the model's maximum length 4096"):
    check_fits(cfg, 4096, 1)
  check_fits(cfg, 40960, 1)
  with pytest.raises(ConfigError, match="max_prompt_len \\+ rationale_budget \\+ 2"):
    check_fits(cfg, cfg.total_len(1), 2)  # a two-token closing tag needs one slot more


def test_unknown_config_name_model_override_and_task_option():
  with pytest.raises(ConfigError, match="no config named 'nope'"):
    load_config("nope")
  with pytest.raises(ConfigError, match="model_overrides key 'layers' is not a scalar ModelConfig field"):
    preset_config(model_spec(TrainConfig(model_overrides="layers=2")))
  assert preset_config(model_spec(TrainConfig(model_overrides="num_layers=3")), vocab_size=50).num_layers == 3
  from tsallis_jax.train.tasks import build_task
  with pytest.raises(ConfigError, match=r"task_options \['p00'\] are unknown"):
    build_task(TrainConfig(task_options="p00=0.1"))


def model_overrides(cfg):
  return typed_overrides(model_spec(cfg).overrides)


def test_model_overrides_are_typed_and_reach_hf_checkpoints_too():
  changes = model_overrides(TrainConfig(model_overrides="remat=true,attention_query_chunk=512,rope_theta=1e5"))
  assert changes == {"remat": "full", "attention_query_chunk": 512, "rope_theta": 1e5}
  assert model_overrides(TrainConfig(model_overrides="remat=dots_saveable,scan_layers=false")) == {
      "remat": "dots_saveable", "scan_layers": False}
  assert model_overrides(TrainConfig(model_overrides="attention_query_chunk=none")) == {
      "attention_query_chunk": None}
  with pytest.raises(ConfigError, match="remat='maybe'.*not one of"):
    model_overrides(TrainConfig(model_overrides="remat=maybe"))
  with pytest.raises(ConfigError, match="expected true or false"):
    model_overrides(TrainConfig(model_overrides="scan_layers=maybe"))
  with pytest.raises(ConfigError, match="expected a int"):
    model_overrides(TrainConfig(model_overrides="num_layers=two"))
  with pytest.raises(ConfigError, match="not a scalar ModelConfig field"):
    model_overrides(TrainConfig(model_overrides="rope_llama3=1"))
  paper = load_config("paper_finqa")
  assert model_overrides(paper) == {"remat": "full", "scan_layers": True, "attention_query_chunk": 512}


def test_hf_model_gets_the_overrides(tmp_path):
  from tsallis_jax.model import ModelConfig, create_model
  from tsallis_jax.model.hf_io import save_hf_checkpoint
  from tsallis_jax.data import synthetic
  tok = synthetic.make_tokenizer()
  tok.save_pretrained(tmp_path)
  save_hf_checkpoint(create_model(ModelConfig.tiny().replace(vocab_size=len(tok))), tmp_path)
  cfg = TrainConfig(model="hf", model_path=str(tmp_path), model_overrides="remat=true,attention_query_chunk=4")
  model, _ = build_model(model_spec(cfg))
  assert model.config.remat == "full" and model.config.attention_query_chunk == 4


def test_config_may_be_a_file_path(tmp_path):
  path = tmp_path / "my_run.py"
  path.write_text("from tsallis_jax.train.config import TrainConfig\n\n\ndef get_config():\n"
                  "  return TrainConfig(name='mine', num_steps=3)\n")
  cfg = load_config(str(path), ["q=0.5"])
  assert (cfg.name, cfg.num_steps, cfg.q) == ("mine", 3, 0.5)
  assert load_config(str(CONFIG_DIR / "smoke.py")) == load_config("smoke")  # a shipped config by path
  with pytest.raises(ConfigError, match="config file .*missing.py' does not exist"):
    load_config(str(tmp_path / "missing.py"))
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="defines no get_config"):
    load_config(str(tmp_path / "empty.py"))


def test_trl_and_tunix_names_are_aliases_or_name_the_right_key():
  cfg = apply_overrides(TrainConfig(), ["num_generations=4", "beta=0.04", "epsilon=0.3", "max_steps=7"])
  assert (cfg.num_samples, cfg.kl_coef, cfg.grpo_clip_eps, cfg.num_steps) == (4, 0.04, 0.3, 7)
  with pytest.raises(ConfigError, match=r"max_completion_length \(TRL\) has no single equivalent.*rationale_budget"
                                        r" \+ 1 .* \+ max_answer_len .*16 \+ 1 \+ 8 = 25.*rationale_budget=N-1-8"):
    apply_overrides(TrainConfig(), ["max_completion_length=256"])
  with pytest.raises(ConfigError, match="num_samples=1 < 2"):  # the alias is validated as its key
    apply_overrides(TrainConfig(), ["num_generations=1"])


def test_memory_keys_reach_the_sampler():
  from tsallis_jax.train import completions
  cfg = TrainConfig(num_samples=4, eval_num_samples=8, batch_size=4, eval_batch_size=4, rollout_chunk_rows=8,
                    kv_cache_dtype="bfloat16")
  train = completions.sampling_config(cfg, stop_ids=(1,), pad_id=0, close_tag_ids=(2,))
  evaluation = completions.sampling_config(cfg, stop_ids=(1,), pad_id=0, close_tag_ids=(2,), evaluation=True)
  assert (train.chunk_rows, train.cache_dtype) == (evaluation.chunk_rows, evaluation.cache_dtype) == (8, "bfloat16")
  default = completions.sampling_config(TrainConfig(), stop_ids=(1,), pad_id=0, close_tag_ids=(2,))
  assert (default.chunk_rows, default.cache_dtype) == (None, None)  # all rows at once, the compute dtype


def test_paper_finqa_1gpu_fits_one_h200_by_its_recorded_analysis():
  """The one-GPU config: the paper's shapes, one device, chunked bfloat16 rollouts, layers under scan with remat;
  the XLA analysis recorded in its MEMORY (rollout and train step) fits 141 GB with headroom
  (`test_memory.py::test_paper_finqa_1gpu_analysis_matches_its_record` recomputes it, slow)."""
  import importlib
  cfg = load_config("paper_finqa_1gpu")
  paper = load_config("paper_finqa")
  for key in ("num_samples", "rationale_budget", "max_answer_len", "max_prompt_len", "batch_size", "dtype"):
    assert getattr(cfg, key) == getattr(paper, key), key
  assert check_mesh(cfg, 1) == (1, 1)
  assert cfg.rollout_chunk_rows < cfg.batch_size * cfg.num_samples and cfg.kv_cache_dtype == "bfloat16"
  memory = importlib.import_module("experiments.configs.paper_finqa_1gpu").MEMORY
  assert memory["rollout"]["peak"] <= 0.9 * 141e9 / 2**30
  assert memory["train_step"]["peak"] <= 0.9 * 141e9 / 2**30 and memory["peak_gib"] <= 0.9 * 141e9 / 2**30
