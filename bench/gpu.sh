#!/usr/bin/env bash
# GPU benchmarks for a lent H100/H200, as one prepared script (device time is scarce: ~15 minutes a session).
#   bash bench/gpu.sh            # full: 1.3B VACE forward at 21x60x104 latents (32,760 tokens), VAE 81x480x832
#   bash bench/gpu.sh --quick    # small shapes, to check the script itself
# Needs jax[cuda] on the machine; prints times, achieved TFLOP/s and device memory.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
$PY bench/gpu_dit.py "$@"
$PY bench/gpu_vae.py "$@"
