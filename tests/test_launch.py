"""launch/tpu.py (the gcloud wrapper) and launch/slices.py, without a TPU or a network.

A fake `gcloud` on PATH records every call it receives, so the tests check both what a dry run prints and what a
real run executes, and that bad arguments fail before any gcloud command runs.
"""
import os
import pathlib
import shlex
import sys
import tarfile
import tempfile
import types

import pytest

from launch import slices, tpu
from tsallis_jax.train import config as train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = "launch_sample"
SLICE = ["--name", "garl-finqa", "--zone", "us-central2-b"]
BUCKET = "gs://my-bucket/runs/garl-finqa"

@pytest.fixture(autouse=True)
def sample_config(monkeypatch):
  """The sample config as a module the trainer's `load_config` imports (experiments.configs.<name>)."""
  module = types.ModuleType(f"experiments.configs.{SAMPLE}")
  module.get_config = lambda: train_config.TrainConfig(name=SAMPLE, model="qwen3_0_6b", batch_size=16)
  monkeypatch.setitem(sys.modules, f"experiments.configs.{SAMPLE}", module)


def _dry_run(capsys, *args: str) -> list[list[str]]:
  """The commands a dry run prints, parsed back into argvs."""
  assert tpu.main([*args, "--dry-run"]) == 0
  out = capsys.readouterr().out
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _remote_command(argv: list[str]) -> list[str]:
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return shlex.split(command)


# --- slices -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, devices, hosts, runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5e-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5p-16", 8, 2, "v2-alpha-tpuv5"),
    ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v3-32", 32, 4, "tpu-ubuntu2204-base"),
])
def test_parse_accelerator(name, devices, hosts, runtime):
  acc = slices.parse_accelerator(name)
  assert (acc.devices, acc.hosts, acc.runtime_version) == (devices, hosts, runtime)


@pytest.mark.parametrize("name, match", [("v9-8", "unknown accelerator"), ("a100-8", "unknown accelerator"),
                                         ("v4-12", "sizes"), ("v5litepod-2", "sizes")])
def test_parse_accelerator_rejects_unknown(name, match):
  with pytest.raises(ValueError, match=match):
    slices.parse_accelerator(name)


def test_every_suggestion_fits_its_slice():
  for s in slices.SUGGESTIONS.values():
    for acc_name, mesh_text in [(s.accelerator, s.mesh), tuple(s.alternative.split(" with "))]:
      acc = slices.parse_accelerator(acc_name)
      sizes = slices.check_mesh(slices.parse_mesh(mesh_text), acc)
      # The train state, sharded over fsdp, must leave room on each device for activations and the KV cache.
      per_device = slices.train_state_gib(s.params_b) / sizes["fsdp"]
      assert per_device < 0.75 * acc.family.hbm_gib_per_device, (s.model, acc_name, per_device)


# --- dry runs: the commands for a sample config ---------------------------------------------------------------------

def test_up_dry_run_prints_create_sync_run(capsys):
  cmds = _dry_run(capsys, "up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--spot", "--delete-when-done",
                  "--set", "q=0.5")
  verbs = [" ".join(c[:5]) for c in cmds]
  assert verbs == ["gcloud compute tpus tpu-vm describe", "gcloud compute tpus tpu-vm create",
                   "gcloud compute tpus tpu-vm scp", "gcloud compute tpus tpu-vm ssh",
                   "gcloud compute tpus tpu-vm ssh", "gcloud compute tpus tpu-vm delete"]
  describe, create, scp, unpack, run, delete = cmds
  # The suggested slice for the sample's model (qwen3_0_6b) and its runtime.
  assert {"garl-finqa", "--zone=us-central2-b", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base",
          "--spot"} <= set(create)
  assert "--worker=all" in scp and "garl-finqa:tsallis_jax_src.tar.gz" in scp
  assert "--worker=all" in unpack and "tar -xzf tsallis_jax_src.tar.gz -C tsallis_jax" in unpack[-1]
  assert "--worker=all" in run
  remote = _remote_command(run)
  assert remote[:3] == ["cd", "tsallis_jax", "&&"]
  host = remote[3:]
  assert host[:4] == ["bash", "launch/host.sh", "--accelerator", "tpu"]
  assert "--multihost" not in host  # v4-8 is one host
  assert host[host.index("--config") + 1] == SAMPLE and host[host.index("--workdir") + 1] == BUCKET
  train = host[host.index("--") + 1:]
  assert train == ["--set", "mesh_data=4", "--set", "mesh_fsdp=1", "--set", "q=0.5"]
  assert delete[-1] == "--quiet" and "garl-finqa" in delete


def test_multihost_queued_dry_run(capsys):
  cmds = _dry_run(capsys, "up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--accelerator", "v4-32",
                  "--mesh", "data=-1,fsdp=4", "--queued", "--spot", "--env", "HF_HOME=/tmp/hf cache", "--detach")
  create = next(c for c in cmds if "create" in c)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "garl-finqa"]
  assert {"--node-id=garl-finqa", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
          "--spot"} <= set(create)
  assert "queued-resources" in next(c for c in cmds if "describe" in c)
  remote = _remote_command(cmds[-1])
  assert remote[3] == "nohup" and remote[4] == "HF_HOME=/tmp/hf cache" and remote[-1] == "&"
  host = remote[5:]
  assert host[host.index("--multihost") + 1] == "auto"  # four workers: jax.distributed on every one
  assert host[host.index("--") + 1:host.index("--") + 5] == ["--set", "mesh_data=4", "--set", "mesh_fsdp=4"]


def test_delete_logs_status_dry_runs(capsys):
  (delete,) = _dry_run(capsys, "delete", *SLICE)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "garl-finqa", "--zone=us-central2-b",
                    "--quiet"]
  (qdelete,) = _dry_run(capsys, "delete", *SLICE, "--queued", "--project", "my-proj")
  assert qdelete[3:5] == ["queued-resources", "delete"] and {"--force", "--quiet", "--project=my-proj"} <= set(
      qdelete)
  (logs,) = _dry_run(capsys, "logs", *SLICE, "--worker", "0")
  assert "--worker=0" in logs and _remote_command(logs)[:2] == ["tail", "-n"]
  (status,) = _dry_run(capsys, "status", *SLICE)
  assert status[4] == "describe"


def test_local_dry_run_is_the_same_host_script(capsys):
  (local,) = _dry_run(capsys, "local", "--config", SAMPLE, "--workdir", "/tmp/run", "--set", "q=1.0")
  assert local[:4] == ["bash", "launch/host.sh", "--accelerator", "auto"]
  assert local[local.index("--") + 1:] == ["--set", "q=1.0"]  # the config's own mesh: all local devices


# --- a fake gcloud: what a real run executes equals what the dry run printed ----------------------------------------

_FAKE_GCLOUD = """#!{python}
import os, shlex, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(shlex.join(["gcloud", *argv]) + "\\n")
state = os.environ["FAKE_GCLOUD_STATE"]
if "describe" in argv:
  if not os.path.exists(state):
    sys.exit(1)
  print(open(state).read().strip())
elif "create" in argv:
  open(state, "w").write("READY")
elif "delete" in argv and os.path.exists(state):
  os.remove(state)
elif "ssh" in argv and "host.sh" in argv[-1] and os.environ.get("FAKE_GCLOUD_EXIT_75_ONCE"):
  marker = state + ".exit_75_once"
  if not os.path.exists(marker):  # the trainer got a preemption notice, saved and exited 75; the slice lives on
    open(marker, "w").close()
    sys.exit(75)
elif "ssh" in argv and "host.sh" in argv[-1] and os.environ.get("FAKE_GCLOUD_PREEMPT_ONCE"):
  os.environ.pop("FAKE_GCLOUD_PREEMPT_ONCE")
  marker = state + ".preempted_once"
  if not os.path.exists(marker):
    open(marker, "w").close()
    open(state, "w").write("PREEMPTED")
    sys.exit(255)
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch, capsys):
  """Runs the wrapper in this process with a recording `gcloud` first on PATH; returns (status, out, err, calls)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(_FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(tmp_path / "calls.txt"))
  monkeypatch.setenv("FAKE_GCLOUD_STATE", str(tmp_path / "state"))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the source archive is packed
  monkeypatch.setattr(tpu.time, "sleep", lambda s: None)

  def launch(*args: str, **extra_env: str):
    for key, value in extra_env.items():
      monkeypatch.setenv(key, value)
    capsys.readouterr()
    status = tpu.main(list(args))
    out, err = capsys.readouterr()
    log = tmp_path / "calls.txt"
    calls = log.read_text().splitlines() if log.exists() else []
    if log.exists():
      log.unlink()
    return status, out, err, calls

  return launch


def test_real_run_executes_what_the_dry_run_prints(fake_gcloud):
  args = ["up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--spot", "--delete-when-done"]
  status, out, err, calls = fake_gcloud(*args, "--dry-run")
  assert status == 0, err
  assert calls == []  # a dry run runs nothing
  printed = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
  status, out, err, calls = fake_gcloud(*args)
  assert status == 0, err
  # The real run also polls `describe` until the new slice is READY; otherwise the same commands in order.
  without_describe = lambda cmds: [c for c in cmds if " describe " not in c]  # noqa: E731
  assert without_describe(calls) == without_describe(printed)
  assert any(" tpu-vm create " in c for c in calls) and calls[-1].startswith("gcloud compute tpus tpu-vm delete")


def test_preempted_slice_is_recreated_and_the_run_repeated(fake_gcloud):
  status, out, err, calls = fake_gcloud("up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--spot",
                                        "--retries", "2", FAKE_GCLOUD_PREEMPT_ONCE="1")
  assert status == 0, err
  creates = [i for i, c in enumerate(calls) if " tpu-vm create " in c]
  runs = [i for i, c in enumerate(calls) if "launch/host.sh" in c]
  assert len(creates) == 2 and len(runs) == 2  # once, then again after the preemption
  assert creates[0] < runs[0] < creates[1] < runs[1]
  assert any(" tpu-vm delete " in c for c in calls[runs[0]:creates[1]])  # the dead slice is deleted first
  assert calls[runs[0]] == calls[runs[1]]  # the same command: the trainer resumes from the bucket workdir


def test_trainer_exit_75_on_a_live_slice_is_run_again(fake_gcloud):
  """Exit status 75 (the trainer saved a checkpoint after a preemption notice) means "resume": same slice, same
  command; without --retries it is returned as is."""
  from tsallis_jax.train import preemption
  assert tpu.PREEMPTED_EXIT_STATUS == preemption.PREEMPTED_EXIT_STATUS == 75
  args = ("up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--spot")
  status, out, err, calls = fake_gcloud(*args, "--retries", "1", FAKE_GCLOUD_EXIT_75_ONCE="1")
  assert status == 0, err
  runs = [c for c in calls if "launch/host.sh" in c]
  assert len(runs) == 2 and runs[0] == runs[1]
  assert len([c for c in calls if " tpu-vm create " in c]) == 1  # the live slice is reused
  assert "preempted on a live slice (exit 75)" in out
  (pathlib.Path(os.environ["FAKE_GCLOUD_STATE"] + ".exit_75_once")).unlink()
  status, out, err, calls = fake_gcloud(*args, FAKE_GCLOUD_EXIT_75_ONCE="1")
  assert status == 1 and len([c for c in calls if "launch/host.sh" in c]) == 1  # no retries left


# --- bad arguments fail before anything is created ------------------------------------------------------------------

@pytest.mark.parametrize("changes, flags, message", [
    ({}, ["--accelerator", "v9-8"], "unknown accelerator type 'v9-8'"),
    ({}, ["--accelerator", "tpu-v4-8"], "unknown accelerator type"),
    ({}, ["--accelerator", "v4-8", "--mesh", "data=3,fsdp=1"], "v4-8 has 4 devices"),
    ({}, ["--accelerator", "v4-32", "--mesh", "data=-1,fsdp=3"], "does not divide the 16 devices"),
    ({}, ["--accelerator", "v4-64"], "batch_size=16 does not split over the 32 devices"),
    ({"--workdir": "/home/me/runs/garl"}, [], "not a bucket path"),
    ({"--workdir": None}, [], "--workdir is required"),
    ({"--workdir": "gs://My_Bucket/x"}, [], "gs://BUCKET/PATH"),
    ({"--config": "no_such_config"}, [], "no config named 'no_such_config'"),
    ({}, ["--set", "qq=0.5"], "did you mean 'q'"),
    ({}, ["--set", "mesh_fsdp=2"], "--mesh data=D,fsdp=F"),
    ({}, ["--spot", "--preemptible"], "exclusive"),
    ({}, ["--detach", "--retries", "3"], "cannot watch for preemption"),
    ({"--name": "Bad_Name"}, [], "TPU name"),
    ({"--zone": None}, [], "--zone is required"),
])
def test_bad_arguments_fail_before_any_gcloud_call(fake_gcloud, changes, flags, message):
  named = {"--name": "garl-finqa", "--zone": "us-central2-b", "--config": SAMPLE, "--workdir": BUCKET, **changes}
  argv = ["up"] + [x for k, v in named.items() if v is not None for x in (k, v)] + flags
  status, out, err, calls = fake_gcloud(*argv)
  assert status == 2, (out, err)
  assert message in err
  assert calls == [] and "+ gcloud" not in out


def test_the_fake_gcloud_does_record_calls(fake_gcloud):
  """The control for the test above: the same arguments, valid, do reach gcloud."""
  status, out, err, calls = fake_gcloud("create", *SLICE, "--accelerator", "v4-8")
  assert status == 0, err
  assert [c.split()[4] for c in calls] == ["describe", "create", "describe"]


def test_sync_workdir_is_passed_to_the_host_script_on_one_host(capsys, fake_gcloud):
  cmds = _dry_run(capsys, "up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--sync-workdir")
  host = _remote_command(cmds[-1])[3:]
  assert "--sync-workdir" in host[:host.index("--")]
  status, out, err, calls = fake_gcloud("up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--accelerator",
                                        "v4-32", "--sync-workdir")
  assert status == 2 and "v4-32 has 4 hosts" in err and calls == []


def test_fetch_goes_to_every_worker(capsys, fake_gcloud):
  cmds = _dry_run(capsys, "up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, "--fetch",
                  "data_dir=gs://my-bucket/data/finqa")
  host = _remote_command(cmds[-1])[3:]
  assert host[host.index("--fetch") + 1] == "data_dir=gs://my-bucket/data/finqa"
  for bad, message in [(["--fetch", "data_dir=/home/me/finqa"], "KEY=gs://BUCKET/PATH"),
                       (["--fetch", "q=gs://my-bucket/q"], "KEY=gs://BUCKET/PATH"),
                       (["--fetch", "data_dir=gs://my-bucket/d", "--set", "data_dir=/x"], "drop --set data_dir")]:
    status, out, err, calls = fake_gcloud("up", *SLICE, "--config", SAMPLE, "--workdir", BUCKET, *bad)
    assert status == 2 and message in err and calls == []


def test_tpu_md_table_matches_the_suggestions():
  """The README snippet's slice table names the same slice for each model as launch/slices.py."""
  text = open(os.path.join(REPO, "launch", "TPU.md"), encoding="utf-8").read()
  for s in slices.SUGGESTIONS.values():
    size = s.model.split("_", 1)[1].replace("_", ".").upper()  # qwen3_0_6b -> 0.6B
    (row,) = [line for line in text.splitlines() if line.startswith(f"| Qwen3-{size}")]
    assert f"| {s.accelerator}" in row, row
    assert s.alternative.split(" with ")[0] in row, row


def test_pack_source_holds_the_code_and_not_the_venv(tmp_path):
  archive = tmp_path / "src.tar.gz"
  count = tpu.pack_source(str(archive))
  names = tarfile.open(archive).getnames()
  assert len(names) == count
  assert {"launch/host.sh", "tsallis_jax/distributed.py", "requirements.txt", "pyproject.toml"} <= set(names)
  assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)


@pytest.mark.parametrize("model, path, key", [
    ("qwen3_0_6b", "", "qwen3_0_6b"),
    ("hf", "/models/Qwen3-0.6B/", "qwen3_0_6b"),
    ("gguf", "gs://b/m/Qwen3-1.7B.gguf", "qwen3_1_7b"),
    ("tiny", "", "tiny"),
])
def test_model_key(model, path, key):
  assert slices.model_key(model, path) == key


def test_hf_weights_fetched_from_the_bucket_pick_the_suggested_slice(capsys, monkeypatch):
  module = types.ModuleType("experiments.configs.hf_sample")
  module.get_config = lambda: train_config.TrainConfig(name="hf_sample", model="hf", model_path="/local/weights",
                                                       batch_size=16)
  monkeypatch.setitem(sys.modules, "experiments.configs.hf_sample", module)
  cmds = _dry_run(capsys, "up", *SLICE, "--config", "hf_sample", "--workdir", BUCKET, "--fetch",
                  "model_path=gs://my-bucket/models/Qwen3-0.6B")
  assert "--accelerator-type=v4-8" in next(c for c in cmds if "create" in c)


def test_tpu_md_shows_the_real_dry_run_output(capsys, monkeypatch):
  """The recipe's one command, run as a dry run on the trainer's paper_finqa config, prints what TPU.md shows."""
  monkeypatch.setattr(tempfile, "tempdir", "/tmp")
  text = open(os.path.join(REPO, "launch", "TPU.md"), encoding="utf-8").read()
  command = text[text.index("python -m launch.tpu up"):text.index("```", text.index("python -m launch.tpu up"))]
  argv = shlex.split(command.replace("\\\n", " "))[3:]
  assert tpu.main([*argv, "--dry-run"]) == 0
  out, err = capsys.readouterr()
  printed = out.replace(tpu.REPO_ROOT, "/path/to/clone").splitlines()[1:]
  doc = text.splitlines()
  assert len(printed) > 5 and all(line in doc for line in printed), [line for line in printed if line not in doc]
  assert "warning" not in err  # the paper config's step fits its suggested slice, as the recipe says
  # Without micro-batching, chunked log-probs and remat the same command warns about the train step.
  assert tpu.main([*argv, "--set", "micro_batch_prompts=0", "--set", "logprob_chunk=0", "--set", "model_overrides=",
                   "--accelerator", "v4-64", "--mesh", "data=8,fsdp=4", "--dry-run"]) == 0
  assert "train step keeps" in capsys.readouterr().err


def test_tpu_md_paper_table_is_current():
  """TPU.md's paper-runs table is what `python -m launch.slices` prints for the trainer's paper configs."""
  doc = open(os.path.join(REPO, "launch", "TPU.md"), encoding="utf-8").read().splitlines()
  table = slices.paper_table(["paper_finqa", "paper_hotpotqa", "paper_musique"]).splitlines()
  assert all(line in doc for line in table), [line for line in table if line not in doc]


def test_memory_estimate_matches_the_model_and_the_sampler():
  """Parameter count and KV-cache size against the library's own model and cache (shapes only, no compute)."""
  import jax
  import numpy as np
  from flax import nnx

  from tsallis_jax.model import config as model_config
  from tsallis_jax.model import init_cache
  from tsallis_jax.model.transformer import abstract_model

  preset = model_config.ModelConfig.qwen3_0_6b()
  dims = slices.MODEL_DIMS["qwen3_0_6b"]
  assert (dims.layers, dims.embed, dims.mlp, dims.heads, dims.kv_heads, dims.head_dim, dims.vocab) == (
      preset.num_layers, preset.embed_dim, preset.mlp_dim, preset.num_heads, preset.num_kv_heads, preset.head_dim,
      preset.vocab_size)
  params = nnx.state(abstract_model(preset), nnx.Param)
  assert dims.params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  tiny = slices.ModelDims(layers=2, embed=32, mlp=64, heads=4, kv_heads=2, head_dim=8, vocab=100)
  cfg = model_config.ModelConfig.qwen3_0_6b(num_layers=2, embed_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2,
                                            head_dim=8, vocab_size=100)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch_size=3 * 5, max_len=40, dtype=jax.numpy.bfloat16))
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  est = slices.estimate_memory(tiny, batch_size=3, num_samples=5, seq_len=40, devices=1, fsdp=1, compute_bytes=2)
  assert est.rollout_kv * 2**30 == pytest.approx(cache_bytes)
  # Per device: the KV cache splits over all devices, the state over fsdp only.
  split = slices.estimate_memory(tiny, batch_size=3, num_samples=5, seq_len=40, devices=4, fsdp=2, compute_bytes=2)
  assert split.rollout_kv == pytest.approx(est.rollout_kv / 4) and split.state == pytest.approx(est.state / 2)


def test_suggest_for_config_is_the_smallest_slice_that_fits():
  cfg = train_config.load_config("paper_hotpotqa")
  name, mesh, est = slices.suggest_for_config(cfg)
  acc = slices.parse_accelerator(name)
  assert est.peak <= slices.HEADROOM * acc.family.hbm_gib_per_device
  assert cfg.batch_size % acc.devices == 0 and (cfg.micro_batch_prompts * cfg.num_samples) % acc.devices == 0
  sizes = slices.check_mesh(slices.parse_mesh(mesh), acc, cfg.batch_size)
  train_config.check_mesh(cfg.replace(mesh_data=sizes["data"], mesh_fsdp=sizes["fsdp"]), acc.devices)
  for smaller in slices.CANDIDATES[:slices.CANDIDATES.index(name)]:
    small = slices.parse_accelerator(smaller)
    if cfg.batch_size % small.devices == 0:  # every mesh on a smaller slice runs out of memory
      needs = [e.peak for f in (1, 2, 4, 8, 16, 32, 64) if f <= small.devices
               for e in [slices.estimate_for_config(cfg, small, {"data": small.devices // f, "fsdp": f})]]
      assert min(needs) > slices.HEADROOM * small.family.hbm_gib_per_device
  # Half the prompts per step need a slice at most as large.
  smaller_name, _, _ = slices.suggest_for_config(cfg.replace(batch_size=cfg.batch_size // 2))
  assert slices.parse_accelerator(smaller_name).devices <= acc.devices
  assert sizes["data"] * sizes["fsdp"] == acc.devices


def test_memory_estimate_shrinks_with_the_trainers_memory_settings():
  """micro_batch_prompts, logprob_chunk, remat and query-chunked attention each shrink the train-step term only."""
  dims = slices.MODEL_DIMS["qwen3_0_6b"]
  shape = dict(batch_size=32, num_samples=32, seq_len=6145, devices=32, fsdp=4, compute_bytes=2, ref_params=False)
  full = slices.estimate_memory(dims, **shape)
  settings = [dict(micro_batch_prompts=1), dict(logprob_chunk=512), dict(remat=True),
              dict(attention_query_chunk=512)]
  for knob in settings:
    est = slices.estimate_memory(dims, **shape, **knob)
    assert est.train_activations < full.train_activations, knob
    assert est.rollout_kv == full.rollout_kv, knob
  # Micro-batching keeps the activations of m*G rows instead of B*G (the logits term too): 32 times fewer here.
  micro = slices.estimate_memory(dims, **shape, micro_batch_prompts=1)
  assert micro.train_activations == pytest.approx(full.train_activations / 32)
  # Chunked logits hold c of the T positions' float32 logits.
  chunked = slices.estimate_memory(dims, **shape, logprob_chunk=512)
  logits_saved = 32 * 32 * (6145 - 512) * dims.vocab * 4 / 32 / 2**30
  assert full.train_activations - chunked.train_activations == pytest.approx(logits_saved)
  every = slices.estimate_memory(dims, **shape, **{k: v for knob in settings for k, v in knob.items()})
  assert every.train_activations < min(slices.estimate_memory(dims, **shape, **k).train_activations
                                       for k in settings)

  # The trainer's paper config sets all four, and the estimate for it follows them.
  cfg = train_config.load_config("paper_finqa")
  acc, mesh = slices.parse_accelerator("v4-64"), {"data": 8, "fsdp": 4}
  paper = slices.estimate_for_config(cfg, acc, mesh)
  off = slices.estimate_for_config(cfg.replace(micro_batch_prompts=0, logprob_chunk=0, model_overrides=""), acc, mesh)
  assert paper.train_activations < off.train_activations / 1000
  assert paper.peak <= slices.HEADROOM * acc.family.hbm_gib_per_device < off.peak
