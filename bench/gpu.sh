#!/usr/bin/env bash
# GPU benchmarks for a lent H100/H200, as one prepared script (device time is scarce: ~15 minutes a session).
#   bash bench/gpu.sh            # full: 1.3B VACE forward at 21x60x104 latents (32,760 tokens), VAE 81x480x832,
#                                #   the LoRA train step and the 20-step skip-4 CS-CFG sampler at that size
#   bash bench/gpu.sh --quick    # small shapes, to check the script itself (on CPU: tiny configs)
# Needs jax[cuda] on the machine; prints times, achieved TFLOP/s, MFU and device memory. Each benchmark has its own
# timeout (dit 150 s, vae 90 s, train 180 s, sample 150 s) so the whole script stays under 10 minutes; a benchmark
# that runs out of time prints what it measured so far and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
BACKEND=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null || echo unknown)
DIT_CPU=()  # gpu_dit's --quick keeps the real width; without an accelerator use its tiny smoke-test shapes
if [[ "$BACKEND" == cpu && " $* " == *" --quick "* ]]; then DIT_CPU=(--config tiny --latent 2x4x4 --impls auto,xla); fi
run() {  # run <seconds> <script> [args]: one benchmark under its own time limit
  local limit=$1; shift
  echo "=== $1 (limit ${limit} s)"
  timeout --kill-after=10 "$limit" $PY "$@" || echo "=== $1 exited with status $? (124: out of time)"
}
run 150 bench/gpu_dit.py "$@" "${DIT_CPU[@]}"
run 90 bench/gpu_vae.py "$@"
run 180 bench/gpu_train.py "$@"
run 150 bench/gpu_sample.py "$@"
