#!/usr/bin/env bash
# The idempotent host script: set up this host and run the training entry point. The same command runs on every
# worker of a Cloud TPU slice (`python -m launch.tpu` calls it with `ssh --worker=all`), on a multi-GPU host, and
# on a laptop. Re-running it is safe and is how a preempted run resumes: the venv is reused when the pinned
# requirements did not change, and `experiments.train` resumes from the newest checkpoint in --workdir.
#
#   bash launch/host.sh --config NAME --workdir gs://BUCKET/runs/NAME [options] [-- args for experiments.train]
#
# Steps: 1. find Python >= 3.11 (install python3.11 with apt when missing); 2. create or reuse the venv;
# 3. install requirements.txt + the accelerator's jax extra + launch/requirements-cloud.txt, then the package,
# unless the venv's stamp says exactly these are installed; 4. export the multi-host variables that
# tsallis_jax.distributed.maybe_initialize reads; 5. run `python -m experiments.train`, its output also appended to
# the log file. A SIGTERM or SIGINT to this script is passed on to the trainer as SIGTERM (its preemption notice: it
# saves the current step and exits 75); the script then exits with the trainer's status, and 75 means "run this
# same command again to resume" (what `python -m launch.tpu up --retries N` does).
#
# Options:
#   --config NAME            experiments/configs/NAME.py (required)
#   --workdir DIR            checkpoints and metrics; gs://... on TPU slices (required)
#   --accelerator KIND       tpu | gpu | cpu | auto (default auto: /dev/accel* or /dev/vfio -> tpu, nvidia-smi -> gpu)
#   --venv DIR               virtual environment (default .venv in the repository)
#   --skip-install           use the venv as it is (it must hold the dependencies and the package)
#   --multihost auto         multi-host TPU slice: jax.distributed finds the other workers itself
#   --coordinator HOST:PORT  multi-host GPU (or two local test processes): process 0's address ...
#   --num-processes N        ... the process count ...
#   --process-id I           ... and this process's id
#   --log FILE               append all output here (default logs/host.log in the repository)
#   --sync-workdir           one host only: train in a local mirror of the gs:// --workdir, downloaded before the
#                            run and uploaded with `gcloud storage rsync` every --sync-every seconds and at exit
#                            (for a trainer that cannot write gs:// itself; see launch/TPU.md)
#   --mirror DIR             the local mirror (default ~/tsallis_runs/<hash of --workdir>)
#   --sync-every S           seconds between uploads (default 600)
#   --fetch KEY=gs://B/P     copy a folder or file from the bucket to ~/tsallis_fetch/KEY/<last part of P> (files
#                            already there are kept) and pass --set KEY=<that path>; KEY is data_dir (the dataset's
#                            official files), model_path (HF folder or .gguf) or init_checkpoint. Repeatable.
#   --dry-run                print the commands this host would run, run none
#   --print-stamp            print the install stamp for this accelerator and exit
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="" WORKDIR="" ACCELERATOR="auto" VENV="" SKIP_INSTALL=0 MULTIHOST="" COORDINATOR="" NUM_PROCESSES=""
PROCESS_ID="" LOG="" DRY_RUN=0 PRINT_STAMP=0 SYNC_WORKDIR=0 MIRROR="" SYNC_EVERY=600
TRAIN_ARGS=() FETCH=()

die() { echo "host.sh: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --accelerator) need_value "$@"; ACCELERATOR="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --multihost) need_value "$@"; MULTIHOST="$2"; shift 2 ;;
    --coordinator) need_value "$@"; COORDINATOR="$2"; shift 2 ;;
    --num-processes) need_value "$@"; NUM_PROCESSES="$2"; shift 2 ;;
    --process-id) need_value "$@"; PROCESS_ID="$2"; shift 2 ;;
    --log) need_value "$@"; LOG="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --sync-workdir) SYNC_WORKDIR=1; shift ;;
    --mirror) need_value "$@"; MIRROR="$2"; shift 2 ;;
    --sync-every) need_value "$@"; SYNC_EVERY="$2"; shift 2 ;;
    --fetch) need_value "$@"; FETCH+=("$2"); shift 2 ;;
    --print-stamp) PRINT_STAMP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (arguments for experiments.train go after '--'; see the header of launch/host.sh)" ;;
  esac
done

VENV="${VENV:-$REPO/.venv}"
LOG="${LOG:-$REPO/logs/host.log}"

# --- validate everything before doing anything -------------------------------------------------------------------
if [[ "$ACCELERATOR" == auto ]]; then
  if compgen -G "/dev/accel*" > /dev/null || compgen -G "/dev/vfio/[0-9]*" > /dev/null; then ACCELERATOR=tpu
  elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then ACCELERATOR=gpu
  else ACCELERATOR=cpu; fi
fi
case "$ACCELERATOR" in
  tpu|gpu|cpu) ;;
  *) die "--accelerator '$ACCELERATOR' is not one of tpu, gpu, cpu, auto" ;;
esac
JAX_VERSION="$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$REPO/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || die "requirements.txt pins no jax==VERSION"
case "$ACCELERATOR" in
  tpu) EXTRA=("jax[tpu]==$JAX_VERSION") ;;
  gpu) EXTRA=("jax[cuda12]==$JAX_VERSION") ;;
  cpu) EXTRA=() ;;
esac

stamp() {  # what the venv must have been installed from; a change re-runs the install
  { cat "$REPO/requirements.txt" "$REPO/launch/requirements-cloud.txt" "$REPO/pyproject.toml"
    echo "accelerator=$ACCELERATOR"; } | sha256sum | cut -d' ' -f1
}
if [[ $PRINT_STAMP == 1 ]]; then stamp; exit 0; fi

[[ -n "$CONFIG" ]] || die "--config NAME is required (a file in experiments/configs/)"
[[ -n "$WORKDIR" ]] || die "--workdir DIR is required (gs://BUCKET/PATH on a TPU slice)"
[[ -f "$REPO/experiments/configs/$CONFIG.py" || -f "$REPO/experiments/configs/$CONFIG/__init__.py" ]] \
  || die "no config experiments/configs/$CONFIG.py"
if [[ -n "$MULTIHOST" && "$MULTIHOST" != auto ]]; then die "--multihost takes only 'auto'"; fi
if [[ -n "$COORDINATOR$NUM_PROCESSES$PROCESS_ID" ]]; then
  [[ -n "$COORDINATOR" && -n "$NUM_PROCESSES" && -n "$PROCESS_ID" ]] \
    || die "--coordinator, --num-processes and --process-id go together"
  [[ -z "$MULTIHOST" ]] || die "--multihost auto and --coordinator are exclusive"
  [[ "$COORDINATOR" == *:* ]] || die "--coordinator needs HOST:PORT, e.g. 10.0.0.2:8476"
  [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$PROCESS_ID" =~ ^[0-9]+$ ]] \
    || die "--num-processes and --process-id are whole numbers"
  (( PROCESS_ID < NUM_PROCESSES )) || die "--process-id $PROCESS_ID must be < --num-processes $NUM_PROCESSES"
fi
TRAIN_WORKDIR="$WORKDIR"
if [[ $SYNC_WORKDIR == 1 ]]; then
  [[ "$WORKDIR" == gs://* ]] || die "--sync-workdir mirrors a gs:// --workdir; '$WORKDIR' is local already"
  [[ -z "$MULTIHOST$COORDINATOR" ]] \
    || die "--sync-workdir works on one host only: a multi-host checkpoint needs the shared gs:// workdir itself"
  [[ "$SYNC_EVERY" =~ ^[1-9][0-9]*$ ]] || die "--sync-every takes a whole number of seconds"
  TRAIN_WORKDIR="${MIRROR:-$HOME/tsallis_runs/$(printf %s "$WORKDIR" | sha256sum | cut -c1-16)}"
elif [[ -n "$MIRROR" ]]; then
  die "--mirror goes with --sync-workdir"
fi
FETCH_SETS=()  # "KEY=LOCAL" for experiments.train, in the order of --fetch
for item in "${FETCH[@]}"; do
  key="${item%%=*}" src="${item#*=}"
  [[ "$item" == *=* && "$key" =~ ^(data_dir|model_path|init_checkpoint)$ ]] \
    || die "--fetch '$item': write KEY=gs://BUCKET/PATH with KEY one of data_dir, model_path, init_checkpoint"
  src="${src%/}"
  [[ "$src" == gs://?*/?* ]] || die "--fetch '$item': the source must be gs://BUCKET/PATH; for a local path pass \
-- --set $key=PATH"
  FETCH_SETS+=("$key=$HOME/tsallis_fetch/$key/$(basename "$src")")
done
if [[ "$ACCELERATOR" == tpu && "$WORKDIR" != gs://* ]]; then
  echo "host.sh: warning: --workdir '$WORKDIR' is on this VM's disk, which is lost with the slice; use gs://..." >&2
fi

run() {  # print, then run unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

PREEMPTED=75  # tsallis_jax.train.preemption.PREEMPTED_EXIT_STATUS
run_trainer() {  # like run, but in the background so that a SIGTERM to this script reaches the trainer at once
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY_RUN == 0 ]] || return 0
  "$@" & local trainer=$! code=0
  trap 'kill -TERM '"$trainer"' 2> /dev/null || true' TERM INT
  while true; do  # `wait` returns early when a trap ran; wait again until the trainer has exited
    wait "$trainer" && code=0 || code=$?
    kill -0 "$trainer" 2> /dev/null || break
  done
  trap - TERM INT
  if [[ $code == "$PREEMPTED" ]]; then
    echo "host.sh: the trainer was preempted and saved a checkpoint; run the same command again to resume" >&2
  fi
  return "$code"
}

cd "$REPO"
if [[ $DRY_RUN == 0 ]]; then
  mkdir -p "$(dirname "$LOG")"
  exec > >(tee -a "$LOG") 2>&1
  echo "=== host.sh $(date -u +%FT%TZ) on $(hostname): config=$CONFIG workdir=$WORKDIR accelerator=$ACCELERATOR"
fi

# --- 1-3. environment (idempotent) -------------------------------------------------------------------------------
if [[ $SKIP_INSTALL == 0 ]]; then
  PY=""
  for candidate in "${PYTHON:-}" python3.12 python3.11 python3; do
    if [[ -n "$candidate" ]] && command -v "$candidate" > /dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; then
      PY="$candidate"; break
    fi
  done
  if [[ -z "$PY" ]]; then  # TPU VM images (Ubuntu 22.04) ship Python 3.10
    command -v apt-get > /dev/null 2>&1 || die "no Python >= 3.11 found; install one or set PYTHON=/path/to/python3.11"
    run sudo apt-get update -qq
    run sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
    PY=python3.11
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    run "$PY" -m venv "$VENV"
  fi
  WANT="$(stamp)"
  HAVE="$(cat "$VENV/.tsallis_install_stamp" 2> /dev/null || true)"
  if [[ "$WANT" != "$HAVE" ]]; then
    run "$VENV/bin/python" -m pip install --quiet --upgrade pip
    run "$VENV/bin/python" -m pip install --quiet -r requirements.txt -r launch/requirements-cloud.txt "${EXTRA[@]}"
    run "$VENV/bin/python" -m pip install --quiet --no-deps -e .
    if [[ $DRY_RUN == 0 ]]; then echo "$WANT" > "$VENV/.tsallis_install_stamp"; fi
  else
    echo "# $VENV is up to date (stamp $WANT)"
  fi
fi
[[ $DRY_RUN == 1 || -x "$VENV/bin/python" ]] || die "no venv at $VENV; drop --skip-install or pass --venv DIR"

# --- 4. multi-host variables (read by tsallis_jax.distributed.maybe_initialize) -----------------------------------
ENV_ARGS=()
if [[ "$MULTIHOST" == auto ]]; then ENV_ARGS+=("TSALLIS_DISTRIBUTED=auto"); fi
if [[ -n "$COORDINATOR" ]]; then
  ENV_ARGS+=("TSALLIS_COORDINATOR=$COORDINATOR" "TSALLIS_NUM_PROCESSES=$NUM_PROCESSES" "TSALLIS_PROCESS_ID=$PROCESS_ID")
fi
if [[ "$ACCELERATOR" == cpu ]]; then ENV_ARGS+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}"); fi

# --- 5. fetched inputs, then train (resumes from the newest checkpoint in the workdir) ---------------------------
FETCHED_ARGS=()
for i in "${!FETCH[@]}"; do
  key="${FETCH[$i]%%=*}" src="${FETCH[$i]#*=}"
  run mkdir -p "$HOME/tsallis_fetch/$key"
  run gcloud storage cp --recursive --no-clobber "${src%/}" "$HOME/tsallis_fetch/$key/"
  FETCHED_ARGS+=(--set "${FETCH_SETS[$i]}")
done
TRAIN=(env "${ENV_ARGS[@]}" "$VENV/bin/python" -m experiments.train --config "$CONFIG" --workdir "$TRAIN_WORKDIR"
       "${FETCHED_ARGS[@]}" "${TRAIN_ARGS[@]}")
if [[ $SYNC_WORKDIR == 0 ]]; then
  status=0
  run_trainer "${TRAIN[@]}" || status=$?
  exit "$status"
fi

# --sync-workdir: download the bucket's run (the resume point), train locally, upload periodically and at exit.
# Uploads never delete objects in the bucket, so a failed download can never wipe a previous run there.
echo "# training in the local mirror $TRAIN_WORKDIR of $WORKDIR"
run mkdir -p "$TRAIN_WORKDIR"
if [[ $DRY_RUN == 1 ]]; then
  run gcloud storage rsync --recursive "$WORKDIR" "$TRAIN_WORKDIR"
elif listing="$(gcloud storage ls "$WORKDIR" 2>&1)"; then
  run gcloud storage rsync --recursive "$WORKDIR" "$TRAIN_WORKDIR"
elif grep -qi "matched no objects" <<< "$listing"; then
  echo "# $WORKDIR is empty: a fresh run"
else
  die "cannot read $WORKDIR (so cannot resume from it): $listing"
fi
upload() { run gcloud storage rsync --recursive "$TRAIN_WORKDIR" "$WORKDIR"; }
UPLOADER=""
if [[ $DRY_RUN == 0 ]]; then
  (  # killed after training; the trap also ends the sleep, which would otherwise hold the output pipe open
    trap 'kill "$NAP" 2> /dev/null; exit 0' TERM
    while true; do
      sleep "$SYNC_EVERY" & NAP=$!
      wait "$NAP"
      upload || echo "host.sh: warning: upload to $WORKDIR failed; retrying later"
    done
  ) &
  UPLOADER=$!
fi
status=0
run_trainer "${TRAIN[@]}" || status=$?
if [[ -n "$UPLOADER" ]]; then kill "$UPLOADER" 2> /dev/null || true; wait "$UPLOADER" 2> /dev/null || true; fi
upload
exit "$status"
