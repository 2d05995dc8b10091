"""Export of a training workdir as a Hugging Face folder that `transformers` loads with the same logits."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import export as export_cli
from test_loaders import _torch_logits  # transformers' logits with our positions, as the loader parity tests
from tsallis_jax.data import synthetic
from tsallis_jax.model import create_model, load_hf_checkpoint, make_attention_mask, make_positions
from tsallis_jax.train import checkpoint as ckpt_lib
from tsallis_jax.train import export as export_lib
from tsallis_jax.model.build import preset_config
from tsallis_jax.train import state as state_lib
from tsallis_jax.train.config import load_config, model_spec
from tsallis_jax.train.schedules import make_optimizer

TOKENS_NxT = np.array([[3, 4, 5, 6, 7, 8, 9, 10], [0, 0, 0, 5, 6, 7, 8, 2], [0, 11, 12, 13, 14, 15, 16, 17]])


def _ours(model, tokens_NxT, pad_NxT):
  return np.asarray(model(jnp.asarray(tokens_NxT), make_positions(jnp.asarray(pad_NxT)),
                          make_attention_mask(jnp.asarray(pad_NxT)))[0])


def _write_run(workdir, step=2):
  """A workdir as `train_and_evaluate` leaves it (config.json + a full TrainState checkpoint), with params moved
  away from the initialisation so that an export of the init would be caught."""
  cfg = load_config("smoke")
  tok = synthetic.make_tokenizer()
  params = state_lib.pure(nnx.state(create_model(preset_config(model_spec(cfg), vocab_size=len(tok)), seed=cfg.seed)))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  tx = make_optimizer(cfg)
  state = state_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params),
                               key=jax.random.key_data(jax.random.key(0)), ref_params=params)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.max_to_keep)
  checkpointer.save(step, state, {"step": step, "data_state": None, "best": {}, "config": cfg.to_dict()})
  checkpointer.close()
  graphdef = nnx.split(create_model(preset_config(model_spec(cfg), vocab_size=len(tok))))[0]
  return cfg, nnx.merge(graphdef, params)


@pytest.mark.torch
def test_export_loads_in_transformers_with_the_same_logits_sharded_and_with_the_tokenizer(tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  cfg, trained = _write_run(tmp_path / "run")
  assert export_cli.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                          "--max-shard-size", "20KB"]) == 0
  out = tmp_path / "hf"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all((out / f).is_file() for f in shards) and not (out / "model.safetensors").exists()
  config = json.loads((out / "config.json").read_text())
  assert config["dtype"] == "float32" and "torch_dtype" not in config
  tok = synthetic.make_tokenizer()
  assert config["max_position_embeddings"] == cfg.total_len(1)
  assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (
      tok.eos_token_id, tok.pad_token_id, None)
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert (generation.eos_token_id, generation.pad_token_id, generation.top_k) == (tok.eos_token_id,
                                                                                  tok.pad_token_id, 0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.convert_tokens_to_ids(["<think>", "</think>"]) == tok.convert_tokens_to_ids(["<think>", "</think>"])
  assert hf_tok("7 + 3 <think>")["input_ids"] == tok("7 + 3 <think>")["input_ids"]

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  pad_NxT = TOKENS_NxT != 0
  ref_NxTxV = _torch_logits(hf_model, TOKENS_NxT, pad_NxT)
  ours_NxTxV = _ours(trained, TOKENS_NxT, pad_NxT)
  diff = np.abs(ours_NxTxV - ref_NxTxV)[pad_NxT].max()
  print(f"max |logit difference| transformers vs ours: {diff:.3g}")
  np.testing.assert_allclose(ref_NxTxV[pad_NxT], ours_NxTxV[pad_NxT], atol=1e-5)
  # The export reads back here as the same parameters.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(load_hf_checkpoint(out)), nnx.state(trained))


def test_best_bfloat16_and_push_to_hub_with_a_recording_hf_api(tmp_path, monkeypatch, capsys):
  _, trained = _write_run(tmp_path / "run")
  args = ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--best"]
  assert export_cli.main(args) == 2
  assert "no best-by-validation checkpoint" in capsys.readouterr().err
  shutil.copytree(tmp_path / "run" / "checkpoints" / "2", tmp_path / "run" / "best" / "2")

  calls = []

  class RecordingApi:
    def create_repo(self, repo_id, **kwargs):
      calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
      calls.append(("upload_folder", kwargs))

  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
  assert export_cli.main(args + ["--dtype", "bfloat16", "--push-to-hub", "me/garl-run", "--private"]) == 0
  assert calls[0] == ("create_repo", "me/garl-run", {"private": True, "exist_ok": True})
  assert calls[1][0] == "upload_folder" and calls[1][1]["repo_id"] == "me/garl-run"
  assert calls[1][1]["folder_path"] == str(tmp_path / "hf") and "step 2 (best)" in calls[1][1]["commit_message"]
  out = tmp_path / "hf"
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  from safetensors.numpy import load_file
  assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == jnp.bfloat16
  reloaded = load_hf_checkpoint(out)
  np.testing.assert_array_equal(np.asarray(reloaded.embed[...]),
                                np.asarray(trained.embed[...].astype(jnp.bfloat16).astype(jnp.float32)))


def test_export_errors_name_the_problem(tmp_path, capsys):
  assert export_cli.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "hf")]) == 2
  assert "config.json is missing" in capsys.readouterr().err
  _write_run(tmp_path / "run")
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  config["model_overrides"] = config["model_overrides"].replace("embed_dim=32", "embed_dim=48")
  (tmp_path / "run" / "config.json").write_text(json.dumps(config))
  with pytest.raises(export_lib.ExportError, match="do not match the model rebuilt from config.json"):
    export_lib.export_workdir(tmp_path / "run", tmp_path / "hf")
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()  # nothing moved aside


@pytest.mark.slow
@pytest.mark.torch
def test_smoke_training_run_exports_to_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  from tsallis_jax.train import train_and_evaluate
  cfg = load_config("smoke", ["num_steps=2", "eval_every=2", "tensorboard=false",
                              "task_options=p0=0.1,train=64,val=8,test=0"])
  train_and_evaluate(cfg, tmp_path / "run")
  for best in (False, True):
    folder, step = export_lib.export_workdir(tmp_path / "run", tmp_path / f"hf{best}", best=best)
    state_dir = tmp_path / "run" / ("best" if best else "checkpoints") / str(step) / "state"
    model, _, _ = export_lib.rebuild_model(cfg)
    graphdef, abstract = nnx.split(model)
    params = export_lib.restore_params(state_dir, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_lib.pure(abstract)))
    pad_NxT = TOKENS_NxT != 0
    ours_NxTxV = _ours(nnx.merge(graphdef, params), TOKENS_NxT, pad_NxT)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    np.testing.assert_allclose(_torch_logits(hf_model, TOKENS_NxT, pad_NxT)[pad_NxT], ours_NxTxV[pad_NxT], atol=1e-5)
