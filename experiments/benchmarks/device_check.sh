#!/usr/bin/env bash
# The prepared accelerator check of issue 17, for a GPU machine (about 8 minutes; run from the repository root):
#
#   OUT=/tmp/device_check bash experiments/benchmarks/device_check.sh
#
# 1. Python packages. Where a package index is reachable, INSTALL=1 installs requirements.txt with JAX's CUDA 12
#    wheels at the pinned JAX version (`jax[cuda12]==<pin>`). This workplace's H200 machines reach no index and carry
#    at most 64 MiB, so there the image's own JAX (0.11.x with the CUDA 13 plugin, flax, optax, orbax, transformers)
#    is used and only what it lacks travels as wheels in .whl/ (prepare them on the CPU machine with the `pip
#    download` line in /work/.library/device/README.md: grain and its dependencies, and whatever `pip check` names).
# 2. The model's logit parity tests against transformers (PyTorch is in the image), on the accelerator.
# 3. `python -m experiments.benchmarks.device_check`: the trainer's GRPO and GARL steps and its sampler on
#    Qwen3-0.6B shapes: step time, tokens/s, MFU against a measured bf16 matmul, peak device memory -> $OUT/*.json.
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${INSTALL:-0}" = 1 ]; then
  pin=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
  $PY -m pip install -q -r requirements.txt "jax[cuda12]==$pin" || exit 1
elif compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the repo, and after the image's packages on sys.path
fi
{
  $PY -c "import jax, flax, optax, orbax.checkpoint, transformers; print('jax', jax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"
# On the accelerator (conftest.py defaults to CPU), float32 matmuls at full precision (not TF32) for the tolerance.
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 \
  $PY -m pytest -q -p no:cacheprovider tests/test_loaders.py -k "logits_match_transformers" \
  2>&1 | tee "$OUT/parity.txt"
echo "parity tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/parity.txt"
timeout 420 $PY -m experiments.benchmarks.device_check --out "$OUT/device_check.json" 2>&1 | tee "$OUT/device_check.log"
