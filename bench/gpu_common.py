"""What the bench/gpu_*.py scripts share: the MFU references and the line that reports them.

MFU is given against two references, as the scale-train issue asks: the H100's dense bf16 peak (989 TFLOP/s, the
datasheet number) and what an 8192^3 bf16 matmul reaches on an H100 (790 TFLOP/s; bench/gpu_matmul.py measures it
on the machine at hand). `--peak` / `--matmul-peak` change them for another device.

Every script puts the repository root on sys.path itself (the GPU image has no install of this repository and
no PYTHONPATH), imports only what that image has (jax, flax, optax, orbax, numpy), and takes `--tiny`: tiny configs
and shapes that run on a CPU in seconds (tests/test_gpu_bench.py runs every script that way, so they cannot rot).
"""
from __future__ import annotations

import argparse

H100_PEAK_BF16 = 989e12
H100_MATMUL_BF16 = 790e12


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tiny", action="store_true", help="tiny configs and shapes: a CPU smoke test of the script")
    ap.add_argument("--peak", type=float, default=H100_PEAK_BF16, help="dense bf16 peak FLOP/s of one device")
    ap.add_argument("--matmul-peak", type=float, default=H100_MATMUL_BF16,
                    help="FLOP/s of an 8192^3 bf16 matmul on one device (bench/gpu_matmul.py)")


def mfu(flops_per_s: float, args) -> str:
    """'MFU a % of 989 / b % of 790 TFLOP/s' for an achieved rate."""
    return (f"MFU {flops_per_s / args.peak:6.1%} of {args.peak / 1e12:.0f} / {flops_per_s / args.matmul_peak:6.1%} "
            f"of {args.matmul_peak / 1e12:.0f} TFLOP/s")
