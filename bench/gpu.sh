#!/usr/bin/env bash
# GPU benchmarks for a lent H100/H200, as one prepared script (device time is scarce: ~15 minutes a session).
#   bash bench/gpu.sh            # full: the 8192^3 bf16 matmul, the 1.3B VACE forward at 21x60x104 latents (32,760
#                                #   tokens), the LoRA train step and the 20-step skip-4 CS-CFG sampler at that size,
#                                #   the VAE at 81x480x832
#   bash bench/gpu.sh --quick    # the real width with 4 blocks at smaller shapes
#   bash bench/gpu.sh --tiny     # tiny configs: a CPU smoke test of the script (tests/test_gpu_bench.py runs it)
# The target image has only jax[cuda], flax, optax, orbax-checkpoint, numpy and torch, no network and no install of
# this repository: each bench/gpu_*.py puts the repository root on sys.path itself and imports nothing else (no
# grain, ml_collections, imageio, sentencepiece). PY picks the interpreter (default python3).
#
# Time: the whole script ends within TOTAL_S (530 s, under 9 minutes, start-up included). Each benchmark has its own
# budget (matmul 40 s, dit 120 s, train 150 s, sample 120 s; the VAE, bf16, gets what is left), cut to what remains of
# TOTAL_S, and runs under `timeout -k 5` (SIGTERM, then SIGKILL 5 s later); every script prints each number as soon
# as it is measured, so a benchmark cut short still reports what it measured, and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PY=${PY:-python3}
TOTAL_S=${GPU_BENCH_TOTAL_S:-530}
GRACE=5
SECONDS=0

run() {  # run <budget seconds> <script> [args]: one benchmark, within its budget and what is left of TOTAL_S
  local budget=$1; shift
  local left=$((TOTAL_S - SECONDS - GRACE))
  local limit=$((budget < left ? budget : left))
  if ((limit < 10)); then
    echo "=== $1 skipped: ${left} s left of ${TOTAL_S} s"
    return
  fi
  echo "=== $1 (limit ${limit} s; ${SECONDS} s elapsed)"
  timeout -k "$GRACE" "$limit" "$PY" "$@"
  local rc=$?
  ((rc == 0)) || echo "=== $1 exited with status $rc (124 or 137: out of time)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout -k "$GRACE" 30 "$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
DIT=(--impls auto,chunked)  # plain XLA attention at 32,760 tokens needs 51 GB of logits: not worth the minutes
run 40 bench/gpu_matmul.py "$@"
run 120 bench/gpu_dit.py "${DIT[@]}" "$@"
run 150 bench/gpu_train.py "$@"
run 120 bench/gpu_sample.py "$@"
run 200 bench/gpu_vae.py --dtypes bfloat16 "$@"  # --dtypes bfloat16,float32 adds the fp32 runs and the comparison
echo "=== done in ${SECONDS} s"
