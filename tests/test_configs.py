"""Every shipped config loads and documents itself; unknown keys and impossible values are clear errors."""
import importlib
import pathlib

import pytest

from tsallis_jax.train import loop
from tsallis_jax.train.config import (ConfigError, TrainConfig, apply_overrides, check_fits, check_mesh,
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
    loop.model_config(TrainConfig(model_overrides="layers=2"))
  assert loop.model_config(TrainConfig(model_overrides="num_layers=3"), vocab_size=50).num_layers == 3
  from tsallis_jax.train.tasks import build_task
  with pytest.raises(ConfigError, match=r"task_options \['p00'\] are unknown"):
    build_task(TrainConfig(task_options="p00=0.1"))


def test_model_overrides_are_typed_and_reach_hf_checkpoints_too():
  changes = loop.model_overrides(TrainConfig(model_overrides="remat=true,attention_query_chunk=512,rope_theta=1e5"))
  assert changes == {"remat": "full", "attention_query_chunk": 512, "rope_theta": 1e5}
  assert loop.model_overrides(TrainConfig(model_overrides="remat=dots_saveable,scan_layers=false")) == {
      "remat": "dots_saveable", "scan_layers": False}
  assert loop.model_overrides(TrainConfig(model_overrides="attention_query_chunk=none")) == {
      "attention_query_chunk": None}
  with pytest.raises(ConfigError, match="remat='maybe'.*not one of"):
    loop.model_overrides(TrainConfig(model_overrides="remat=maybe"))
  with pytest.raises(ConfigError, match="expected true or false"):
    loop.model_overrides(TrainConfig(model_overrides="scan_layers=maybe"))
  with pytest.raises(ConfigError, match="expected a int"):
    loop.model_overrides(TrainConfig(model_overrides="num_layers=two"))
  with pytest.raises(ConfigError, match="not a scalar ModelConfig field"):
    loop.model_overrides(TrainConfig(model_overrides="rope_llama3=1"))
  paper = load_config("paper_finqa")
  assert loop.model_overrides(paper) == {"remat": "full", "attention_query_chunk": 512}


def test_hf_model_gets_the_overrides(tmp_path):
  from tsallis_jax.model import ModelConfig, create_model
  from tsallis_jax.model.hf_io import save_hf_checkpoint
  from tsallis_jax.data import synthetic
  tok = synthetic.make_tokenizer()
  tok.save_pretrained(tmp_path)
  save_hf_checkpoint(create_model(ModelConfig.tiny().replace(vocab_size=len(tok))), tmp_path)
  cfg = TrainConfig(model="hf", model_path=str(tmp_path), model_overrides="remat=true,attention_query_chunk=4")
  model, _ = loop.load_model(cfg, None)
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
