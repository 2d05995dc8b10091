#!/usr/bin/env bash
# The prepared accelerator check of issue 17, for a GPU machine (under 10 minutes; run from the repository root):
#
#   OUT=/tmp/device_check bash experiments/benchmarks/device_check.sh
#
# Run on an H200 in two sessions (2026-11-30, with .whl/ carried): experiments/benchmarks/results/device_h200_2026-11-30*/
# and the benchmarks README ("On an accelerator"). The first session's steps did not fit the allocator's default pool;
# the second ran them with the paper configs' memory knobs and the pool below.
# Every part has its own time limit and its own lines in $OUT/stages.txt (exit status, seconds); a part that fails
# does not stop the later ones, and every JSON is written as it goes, so a cut-off run keeps what it measured.
# 0. Python packages. Where a package index is reachable, INSTALL=1 installs requirements.txt with JAX's CUDA 12
#    wheels at the pinned JAX version (`jax[cuda12]==<pin>`). This workplace's H200 machines reach no index and carry
#    at most 64 MiB, so there the image's own JAX (0.11.x with the CUDA 13 plugin; jaxlib alone is 85 MB, too big to
#    carry) is used, and what the image lacks travels as wheels in .whl/ (prepared on the CPU machine with the `pip
#    download` line in /work/.library/device/README.md: grain 0.2.18, array_record 0.8.6, portpicker). The pinned
#    pure-Python flax / optax / orbax-checkpoint / chex go in .whl/pinned/ as a fallback (step 2).
# 1. The environment: versions and the GPU.
# 2. A smoke run of the check on the tiny preset (seconds of work): the gate. If it fails with the image's flax /
#    optax / orbax / chex, the pinned versions from .whl/pinned/ are put first on the path and it runs again; the
#    rest runs with whichever passed (stages.txt says which).
# 3. `python -m experiments.benchmarks.device_check` on Qwen3-0.6B shapes (random weights): attention parity, the
#    trainer's GRPO and GARL steps and its sampler: step time, tokens/s, MFU against a measured bf16 matmul, peak
#    device memory -> $OUT/device_check.json.
# 4. On the accelerator: the model's logit parity against transformers (PyTorch is in the image), the bf16-compute
#    precision tests and the attention tests (float32 matmuls at full precision, not TF32, for the tolerances).
# 5. XLA's memory_analysis() of paper_finqa_1gpu's rollout and train step compiled for this GPU (GEMM autotuning off
#    to bound the compile time; it picks kernels, not buffers)
#    -> $OUT/memory_gpu.json (the committed record in experiments/configs/paper_finqa_1gpu.py is CPU XLA's).
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2
# The pool JAX's GPU allocator takes (default 75% of the free memory: 103.65 GiB on the H200, the exact size of the
# buffer whose request failed on 2026-11-30 -- XLA fits a program's temporaries to the pool, so a step that did not
# fit asked for all of it). 0.92 leaves room for cuDNN / cuBLAS workspaces outside the pool.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Which stages run after the environment (a short device session can leave out what an earlier run measured).
STAGES=${STAGES:-smoke device_check gpu_tests memory_gpu}
want() { [[ " $STAGES " == *" $1 "* ]]; }
# A RAM-backed temporary folder (the timed runs save a checkpoint at their end) where it has room.
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 30000000 ]; then export TMPDIR=/dev/shm; fi

stage() {  # stage NAME SECONDS COMMAND...: runs it under a time limit, its output into the log, a line in stages.txt
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/stages.txt"
  return $rc
}

if [ "${INSTALL:-0}" = 1 ]; then
  pin=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
  stage install 600 $PY -m pip install -q -r requirements.txt "jax[cuda12]==$pin" || exit 1
elif compgen -G ".whl/*.whl" > /dev/null; then
  stage install 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

VERSIONS_PY='
import importlib.metadata as m
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "chex", "transformers", "torch",
          "numpy", "grain"):
  try:
    print(p, m.version(p))
  except m.PackageNotFoundError:
    print(p, "not installed")
import flax, optax, jax
print("flax from", flax.__file__, "| optax from", optax.__file__)
print("devices", jax.devices())'
stage env 60 $PY -c "$VERSIONS_PY"
stage gpu 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

smoke() {
  stage "smoke$1" 100 $PY -m experiments.benchmarks.device_check --model tiny --dtype bfloat16 --steps 2 --batch 2 \
    --samples 2 --prompt-len 16 --rationale 8 --answer 4 --sampler-reps 1 --peak-tflops 1 --parts grpo \
    --out "$OUT/smoke$1.json"
}
if want smoke && ! smoke ""; then
  if compgen -G ".whl/pinned/*.whl" > /dev/null; then
    stage install_pinned 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site_pinned .whl/pinned/*.whl
    export PYTHONPATH="$PWD:/tmp/site_pinned:/tmp/site"  # the pinned flax / optax / orbax / chex before the image's
    stage env_pinned 60 $PY -c "$VERSIONS_PY"
    smoke "_pinned" || echo "the smoke run failed with the image's and with the pinned packages" | tee -a "$LOG"
  fi
fi

want device_check && stage device_check "${DEVICE_CHECK_S:-330}" $PY -m experiments.benchmarks.device_check \
  --parts "${DEVICE_PARTS:-attention,grpo,garl,sampler,grpo_unrolled}" --out "$OUT/device_check.json"

GPU_TESTS=${GPU_TESTS:-tests/test_loaders.py::test_logits_match_transformers_with_and_without_padding \
  tests/test_precision.py tests/test_attention.py}
# shellcheck disable=SC2086  # GPU_TESTS is a list of test ids
want gpu_tests && JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest stage gpu_tests "${GPU_TESTS_S:-120}" \
  $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfE $GPU_TESTS

want memory_gpu && XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" stage memory_gpu "${MEMORY_S:-60}" bash -c \
  "$PY -m tsallis_jax.train.memory paper_finqa_1gpu qwen3_0_6b > '$OUT/memory_gpu.json'"
tail -n 40 "$LOG"
cat "$OUT/stages.txt"
