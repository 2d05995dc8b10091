"""The gcloud wrapper: create a Cloud TPU slice, sync the code, run `launch/host.sh` on every worker, delete it.

One command from a clone to a running GARL job that survives preemption (launch/TPU.md has the whole recipe)::

  python -m launch.tpu up --name garl-finqa --zone us-central2-b --config NAME \\
      --workdir gs://BUCKET/runs/garl-finqa --spot --retries 5 --delete-when-done

Actions: up (create or reuse, sync, run; recreate and resume after a preemption), create, sync, run, logs,
status, delete, and local (run the same host script on this machine, e.g. a multi-GPU host). `--dry-run` prints
every command it would run and runs none. Every argument is checked before any resource is created: an unknown
accelerator type, a mesh that does not divide the slice's devices, a batch that does not split over them, a
workdir that is not a `gs://` bucket path (a TPU VM's disk disappears with the slice), an unknown config or key.
Arguments after `--` go to `python -m experiments.train` unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

from launch import slices

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "tsallis_jax"  # on every worker, relative to the ssh user's home
REMOTE_ARCHIVE = "tsallis_jax_src.tar.gz"
REMOTE_LOG = f"{REMOTE_DIR}/logs/host.log"
ACTIONS = ("up", "create", "sync", "run", "logs", "status", "delete", "local")
# States after which a slice cannot run again and must be deleted and recreated (spot / preemptible slices).
DEAD_STATES = {"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED", "SUSPENDING"}
READY_STATES = {"READY", "ACTIVE"}
FETCH_KEYS = ("data_dir", "model_path", "init_checkpoint")  # config keys naming inputs the workers must copy
# The trainer's exit status after a preemption notice (SIGTERM or JAX's preemption sync point) and a checkpoint of
# the current step: "run me again". Equal to tsallis_jax.train.preemption.PREEMPTED_EXIT_STATUS (a test checks it;
# this module does not import jax).
PREEMPTED_EXIT_STATUS = 75


class LaunchError(ValueError):
  """A launch argument that cannot work; raised before any command runs."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """The validated launch: everything the gcloud command lines are built from."""
  action: str
  name: str
  zone: str
  project: str
  accelerator: slices.Accelerator | None
  config: str
  workdir: str
  mesh: dict[str, int] | None  # passed to the trainer as --set mesh_data/mesh_fsdp; None keeps the config's
  overrides: tuple[str, ...]
  train_args: tuple[str, ...]
  env: tuple[str, ...]
  spot: bool
  preemptible: bool
  queued: bool
  retries: int
  detach: bool
  delete_when_done: bool
  worker: str
  sync_workdir: bool
  fetch: tuple[str, ...]
  memory: slices.MemoryEstimate | None  # per-device estimate for one step on the slice, when the model is known


# --- validation ---------------------------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)
_BUCKET_PATH = re.compile(r"gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9](/.*)?")
_DEFAULT_MESH = {"data": -1, "fsdp": 1}


def _choose_mesh(text, cfg, suggested: str | None) -> tuple[dict[str, int], bool]:
  """The mesh and whether to pass it on: --mesh, else a config's own non-default mesh, else the suggestion for
  this config on this accelerator, else data=-1,fsdp=1."""
  if text:
    return slices.parse_mesh(text), True
  if cfg is not None:
    own = {"data": cfg.mesh_data, "fsdp": cfg.mesh_fsdp}
    if own != _DEFAULT_MESH:
      return own, False
  if suggested:
    return slices.parse_mesh(suggested), True
  return dict(_DEFAULT_MESH), False


def _load_train_config(name: str, overrides: Sequence[str]):
  """The trainer's config with overrides (validates name and keys), or None when the trainer is not importable."""
  try:
    from tsallis_jax.train import config as train_config
  except ImportError as e:  # a clone without the library's dependencies: the workers still validate it
    print(f"# note: cannot import the trainer's config here ({e}); the config is checked on the workers.",
          file=sys.stderr)
    return None
  try:
    return train_config.load_config(name, list(overrides))
  except ValueError as e:
    raise LaunchError(f"config {name!r}: {e}") from None


def validate(args: argparse.Namespace) -> Plan:
  """Checks every argument; raises `LaunchError` naming the problem and the fix. Runs no command."""
  action = args.action
  needs_slice = action != "local"
  if needs_slice:
    if not args.name or not _NAME.fullmatch(args.name):
      raise LaunchError(f"--name {args.name!r}: a TPU name is lowercase letters, digits and hyphens, starting with "
                        "a letter (at most 63 characters), e.g. --name garl-finqa.")
    if not args.zone:
      raise LaunchError("--zone is required, e.g. --zone us-central2-b (v4) or us-west4-a (v5e); see launch/TPU.md.")
  if args.spot and args.preemptible:
    raise LaunchError("--spot and --preemptible are exclusive; use --spot (the newer kind, no 24 h limit).")
  if args.detach and (args.retries or args.delete_when_done):
    raise LaunchError("--detach returns at once, so it cannot watch for preemption (--retries) or the end of the "
                      "run (--delete-when-done); drop --detach, or delete the slice yourself later.")
  if args.queued and args.preemptible:
    raise LaunchError("queued resources take --spot, not --preemptible.")
  for item in args.env:
    if not _ENV.fullmatch(item):
      raise LaunchError(f"--env {item!r} is not of the form NAME=VALUE.")
  for item in args.set:
    key = item.split("=", 1)[0].strip()
    if "=" not in item:
      raise LaunchError(f"--set {item!r} is not of the form key=value.")
    if key in ("mesh_data", "mesh_fsdp"):
      raise LaunchError(f"--set {item!r}: give the mesh with --mesh data=D,fsdp=F, which is checked against the slice.")

  runs_training = action in ("up", "run", "local")
  if action == "local" and args.accelerator:
    raise LaunchError("--accelerator is for TPU slices; `local` uses this machine's devices.")
  cfg = None
  if runs_training:
    if not args.config:
      raise LaunchError("--config is required: the name of a file in experiments/configs/ (without .py).")
    if not args.workdir:
      raise LaunchError("--workdir is required: where checkpoints and metrics go, e.g. --workdir gs://BUCKET/runs/NAME"
                        " (a local folder for `local`).")
    if needs_slice and not args.workdir.startswith("gs://"):
      raise LaunchError(f"--workdir {args.workdir!r} is not a bucket path: on a TPU slice the workdir must be "
                        "gs://BUCKET/PATH, so that a preempted or deleted slice resumes from it and all hosts share "
                        "it. Create one with `gcloud storage buckets create gs://BUCKET --location=REGION`.")
    if args.workdir.startswith("gs://") and not _BUCKET_PATH.fullmatch(args.workdir):
      raise LaunchError(f"--workdir {args.workdir!r}: expected gs://BUCKET/PATH, the bucket name 3 to 63 lowercase "
                        "letters, digits, '-', '_' or '.'.")
    cfg = _load_train_config(args.config, args.set)

  model, pick, static = None, None, None
  if cfg is not None:
    fetched = dict(item.partition("=")[::2] for item in args.fetch)
    model = slices.model_key(cfg.model, fetched.get("model_path", cfg.model_path))
    cfg_for_model = cfg.replace(model_path=fetched["model_path"]) if "model_path" in fetched else cfg
    pick = slices.suggest_for_config(cfg_for_model)  # sized for this config's rollouts
    static = slices.SUGGESTIONS.get(model)  # sized for the model's train state only
  accelerator = None
  if action in ("up", "create", "run"):
    name = args.accelerator or (pick[0] if pick else static.accelerator if static else None)
    if not name:
      raise LaunchError("--accelerator is required (e.g. v4-8, v5litepod-8): no slice suggestion exists for model "
                        f"{model!r} in launch/slices.py; see launch/TPU.md.")
    accelerator = slices.parse_accelerator(name)
  suggested_mesh = None
  if accelerator is not None and pick and accelerator.name == pick[0]:
    suggested_mesh = pick[1]
  elif accelerator is not None and static and accelerator.name == static.accelerator:
    suggested_mesh = static.mesh
  mesh, pass_mesh = _choose_mesh(args.mesh, cfg, suggested_mesh)
  set_keys = {item.split("=", 1)[0].strip() for item in args.set}
  for item in args.fetch:
    key, _, src = item.partition("=")
    if key not in FETCH_KEYS or not _BUCKET_PATH.fullmatch(src):
      raise LaunchError(f"--fetch {item!r}: write KEY=gs://BUCKET/PATH with KEY one of {', '.join(FETCH_KEYS)} "
                        "(copy the files there once with `gcloud storage cp -r DIR gs://BUCKET/...`).")
    if key in set_keys:
      raise LaunchError(f"--fetch {item!r} sets {key} on the workers; drop --set {key}=...")
  if args.sync_workdir and accelerator is not None and accelerator.multi_host:
    raise LaunchError(f"--sync-workdir mirrors the workdir on one host; {accelerator.name} has {accelerator.hosts} "
                      "hosts, whose checkpoint must be written to the gs:// workdir directly.")
  memory = None
  if accelerator is not None:  # pass the resolved sizes: the log then shows the mesh the job really has
    mesh = slices.check_mesh(mesh, accelerator, getattr(cfg, "batch_size", None))
    if cfg is not None:
      memory = slices.estimate_for_config(cfg_for_model, accelerator, mesh)
  return Plan(action=action, name=args.name or "", zone=args.zone or "", project=args.project or "",
              accelerator=accelerator, config=args.config or "", workdir=args.workdir or "",
              mesh=mesh if pass_mesh else None,
              overrides=tuple(args.set), train_args=tuple(args.train_args), env=tuple(args.env), spot=args.spot,
              preemptible=args.preemptible, queued=args.queued, retries=args.retries, detach=args.detach,
              delete_when_done=args.delete_when_done, worker=args.worker, sync_workdir=args.sync_workdir,
              fetch=tuple(args.fetch), memory=memory)


# --- command lines --------------------------------------------------------------------------------------------------

def _scope(plan: Plan) -> list[str]:
  return [f"--zone={plan.zone}"] + ([f"--project={plan.project}"] if plan.project else [])


def create_commands(plan: Plan) -> list[list[str]]:
  """`tpu-vm create` (or a queued resource) for the slice."""
  acc = plan.accelerator
  if plan.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", plan.name, f"--node-id={plan.name}",
             *_scope(plan), f"--accelerator-type={acc.name}", f"--runtime-version={acc.runtime_version}"]
            + (["--spot"] if plan.spot else [])]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", plan.name, *_scope(plan),
           f"--accelerator-type={acc.name}", f"--version={acc.runtime_version}"]
          + (["--spot"] if plan.spot else []) + (["--preemptible"] if plan.preemptible else [])]


def describe_command(plan: Plan) -> list[str]:
  if plan.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", plan.name, *_scope(plan),
            "--format=value(state.state)"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", plan.name, *_scope(plan), "--format=value(state)"]


def delete_command(plan: Plan) -> list[str]:
  if plan.queued:  # --force also deletes the TPU VM the queued resource created
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", plan.name, *_scope(plan), "--force",
            "--quiet"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", plan.name, *_scope(plan), "--quiet"]


def _ssh(plan: Plan, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", plan.name, *_scope(plan), f"--worker={worker}",
          f"--command={command}"]


def sync_commands(plan: Plan, archive: str) -> list[list[str]]:
  """Copy the packed source to every worker and unpack it over the previous copy (the venv survives)."""
  return [["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{plan.name}:{REMOTE_ARCHIVE}", *_scope(plan),
           "--worker=all"],
          _ssh(plan, f"mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}")]


def host_command(plan: Plan, accelerator_kind: str) -> list[str]:
  """The host script's argv: the same on every TPU worker and on a multi-GPU host."""
  argv = ["bash", "launch/host.sh", "--accelerator", accelerator_kind]
  if plan.accelerator is not None and plan.accelerator.multi_host:
    argv += ["--multihost", "auto"]
  if plan.sync_workdir:
    argv += ["--sync-workdir"]
  for item in plan.fetch:
    argv += ["--fetch", item]
  argv += ["--config", plan.config, "--workdir", plan.workdir, "--"]
  if plan.mesh is not None:
    argv += ["--set", f"mesh_data={plan.mesh['data']}", "--set", f"mesh_fsdp={plan.mesh['fsdp']}"]
  for item in plan.overrides:
    argv += ["--set", item]
  argv += list(plan.train_args)
  return argv


def run_commands(plan: Plan) -> list[list[str]]:
  """`ssh --worker=all` running the host script: in the foreground (output streamed) or detached under nohup."""
  env = " ".join(shlex.quote(item) for item in plan.env)
  host = shlex.join(host_command(plan, "tpu"))
  inner = f"{env} {host}".strip()
  if plan.detach:
    inner = f"nohup {inner} > /dev/null 2>&1 < /dev/null &"
  return [_ssh(plan, f"cd {REMOTE_DIR} && {inner}")]


def logs_command(plan: Plan) -> list[str]:
  return _ssh(plan, f"tail -n 200 -F {REMOTE_LOG}", worker=plan.worker)


# --- running -----------------------------------------------------------------------------------------------------

class Runner:
  """Runs argvs, or prints them (`+ cmd`) without running any in dry-run mode."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)

  def call(self, argv: Sequence[str], capture: bool = False) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(argv), file=self.out, flush=True)
    if self.dry_run:
      return subprocess.CompletedProcess(list(argv), 0, stdout="", stderr="")
    return subprocess.run(list(argv), text=True, capture_output=capture, check=False)

  def check(self, argv: Sequence[str]) -> None:
    result = self.call(argv)
    if result.returncode:
      raise SystemExit(f"command failed with exit status {result.returncode}: {shlex.join(argv)}")


def pack_source(archive: str, repo: str = REPO_ROOT) -> int:
  """Packs the files git tracks (and untracked, not ignored ones) into a .tar.gz; returns the file count.

  Outside a git clone (e.g. an unpacked release), packs the tree without venvs, caches, logs and VCS folders.
  """
  listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=False)
  if listing.returncode == 0:
    listed = listing.stdout.decode().split("\0")
  else:
    skip = {".git", ".venv", "venv", "__pycache__", "logs", ".pytest_cache", ".hypothesis"}
    listed = []
    for root, dirs, names in os.walk(repo):
      dirs[:] = [d for d in dirs if d not in skip]
      listed += [os.path.relpath(os.path.join(root, n), repo) for n in names]
  files = [f for f in listed if f and os.path.isfile(os.path.join(repo, f))]
  with tarfile.open(archive, "w:gz") as tar:
    for f in files:
      tar.add(os.path.join(repo, f), arcname=f)
  return len(files)


def slice_state(plan: Plan, runner: Runner) -> str | None:
  """The slice's state (READY, ACTIVE, PREEMPTED, ...), or None when it does not exist (or in a dry run)."""
  result = runner.call(describe_command(plan), capture=True)
  if runner.dry_run or result.returncode:
    return None
  return (result.stdout or "").strip().upper() or None


def ensure_slice(plan: Plan, runner: Runner, poll_s: float = 30.0) -> None:
  """Reuses a ready slice, recreates a dead one, creates a missing one, and waits until it is ready."""
  state = slice_state(plan, runner)
  if state in DEAD_STATES:
    runner.note(f"{plan.name} is {state}: deleting it to create it again")
    runner.check(delete_command(plan))
    state = None
  if state is None:
    for argv in create_commands(plan):
      runner.check(argv)
  elif state in READY_STATES:
    runner.note(f"reusing {plan.name} ({state})")
  if runner.dry_run:
    return
  while (state := slice_state(plan, runner)) not in READY_STATES:
    if state in DEAD_STATES:
      raise SystemExit(f"{plan.name} became {state} while starting; run the same command again to retry.")
    runner.note(f"{plan.name} is {state or 'not visible yet'}; waiting {poll_s:.0f} s")
    time.sleep(poll_s)


def sync(plan: Plan, runner: Runner) -> None:
  archive = os.path.join(tempfile.gettempdir(), f"{plan.name}-{REMOTE_ARCHIVE}")
  if runner.dry_run:
    runner.note(f"pack the git-tracked files of {REPO_ROOT} into {archive}")
  else:
    runner.note(f"packed {pack_source(archive)} files into {archive}")
  for argv in sync_commands(plan, archive):
    runner.check(argv)


def up(plan: Plan, runner: Runner) -> int:
  """Create or reuse, sync, run; after a preemption, recreate and run again (the trainer resumes from workdir)."""
  for attempt in range(plan.retries + 1):
    ensure_slice(plan, runner)
    sync(plan, runner)
    (argv,) = run_commands(plan)
    status = runner.call(argv).returncode
    if status == 0:
      if plan.delete_when_done:
        runner.check(delete_command(plan))
      return 0
    state = slice_state(plan, runner)
    if status == PREEMPTED_EXIT_STATUS and state in READY_STATES:
      runner.note(f"attempt {attempt + 1}: the trainer was preempted on a live slice (exit {status}) and saved a "
                  f"checkpoint; running it again to resume from {plan.workdir}")
      continue
    if state not in DEAD_STATES and state is not None:
      print(f"training exited with status {status} on a {state} slice: not a preemption, not retrying. "
            f"Read the log with `python -m launch.tpu logs --name {plan.name} --zone {plan.zone}`.", file=sys.stderr)
      return status
    runner.note(f"attempt {attempt + 1}: slice {plan.name} is {state or 'gone'} (preempted); recreating it and "
                f"resuming from {plan.workdir}")
  return 1


def report_memory(plan: Plan, runner: Runner) -> None:
  """Prints the per-device memory estimate, and a warning on stderr where a phase of the step will not fit."""
  mem, acc = plan.memory, plan.accelerator
  hbm = acc.family.hbm_gib_per_device
  runner.note(f"memory estimate per device on {acc.name} (shapes only, not measured): train state {mem.state:.1f} "
              f"GiB, rollout KV cache {mem.rollout_kv:.1f} GiB, train-step activations {mem.train_activations:.1f} "
              f"GiB; {hbm} GiB per device")
  if mem.state + mem.rollout_kv > hbm:
    print(f"warning: the rollouts' KV cache and the train state ({mem.state + mem.rollout_kv:.0f} GiB) exceed the "
          f"{hbm} GiB of a {acc.name} device: use a bigger slice, more fsdp, or a smaller batch_size / num_samples.",
          file=sys.stderr)
  if mem.state + mem.train_activations > hbm:
    print(f"warning: the teacher-forced train step keeps ~{mem.train_activations:.0f} GiB of activations per device; "
          "shrink it with --set micro_batch_prompts=1 --set logprob_chunk=512 --set "
          "model_overrides=remat=true,attention_query_chunk=512 (as the paper configs do), fewer tokens per row, or "
          "a bigger slice (launch/TPU.md, 'Paper runs').", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  train_args: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, train_args = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("action", choices=ACTIONS)
  parser.add_argument("--name", help="TPU VM (and queued resource) name")
  parser.add_argument("--zone", help="e.g. us-central2-b (v4), us-west4-a (v5e)")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
  parser.add_argument("--accelerator", help="v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ... (default: the suggestion "
                      "for the config's model in launch/slices.py)")
  parser.add_argument("--mesh", help="data=D,fsdp=F (D or F may be -1 = the rest); default: the suggestion")
  parser.add_argument("--config", help="experiments/configs/<NAME>.py")
  parser.add_argument("--workdir", help="gs://BUCKET/PATH for checkpoints and metrics (resume point)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
  parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment on workers")
  parser.add_argument("--spot", action="store_true", help="spot capacity (cheaper, can be preempted at any time)")
  parser.add_argument("--preemptible", action="store_true", help="legacy preemptible capacity (24 h limit)")
  parser.add_argument("--queued", action="store_true", help="request through a queued resource")
  parser.add_argument("--retries", type=int, default=0, help="up: resume this many times after a "
                      "preemption: a dead slice is recreated; a trainer that exited 75 (preemption notice, checkpoint "
                      "saved) on a live slice is run again")
  parser.add_argument("--detach", action="store_true", help="run under nohup; follow with the `logs` action")
  parser.add_argument("--delete-when-done", action="store_true", help="up: delete the slice after a clean finish")
  parser.add_argument("--sync-workdir", action="store_true", help="single-host slices: train in a local mirror "
                      "of the gs:// workdir, uploaded periodically (launch/host.sh)")
  parser.add_argument("--fetch", action="append", default=[], metavar="KEY=gs://BUCKET/PATH", help="every worker "
                      "copies this (the dataset's official files, HF weights, ...) and trains with KEY set to its copy")
  parser.add_argument("--worker", default="0", help="logs: which worker's log to follow")
  parser.add_argument("--dry-run", action="store_true", help="print every command, run none")
  args = parser.parse_args(argv)
  args.train_args = train_args
  if args.retries < 0:
    parser.error("--retries must be >= 0")
  try:
    plan = validate(args)
  except ValueError as e:  # LaunchError, or a config/mesh error from the library
    print(f"error: {e}", file=sys.stderr)
    return 2

  runner = Runner(args.dry_run)
  if args.dry_run:
    runner.note("dry run: printing every command, running none")
  if plan.memory is not None:
    report_memory(plan, runner)
  if plan.action == "up":
    return up(plan, runner)
  if plan.action == "create":
    ensure_slice(plan, runner)
  elif plan.action == "sync":
    sync(plan, runner)
  elif plan.action == "run":
    (cmd,) = run_commands(plan)
    return runner.call(cmd).returncode
  elif plan.action == "logs":
    return runner.call(logs_command(plan)).returncode
  elif plan.action == "status":
    return runner.call(describe_command(plan)[:-1]).returncode
  elif plan.action == "delete":
    runner.check(delete_command(plan))
  elif plan.action == "local":
    env_prefix = [item for item in plan.env]
    cmd = (["env", *env_prefix] if env_prefix else []) + host_command(plan, "auto")
    if args.dry_run:
      runner.call(cmd)
      return 0
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
