"""The bf16 matmul rate of one device: an N^3 matmul (default 8192), bf16 inputs and output, fp32 accumulation.

On an H100 SXM this reaches about 790 TFLOP/s of the 989 dense peak; the other GPU benchmarks give their MFU against
both numbers (bench/gpu_common.py), and this line says what this machine's matmul reaches.

    python bench/gpu_matmul.py [--n 8192] [--reps 50] [--quick] [--tiny]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import gpu_common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="matrix size (default 8192; --tiny: 256)")
    ap.add_argument("--reps", type=int, default=None, help="matmuls timed back to back (default 50; --tiny: 3)")
    ap.add_argument("--quick", action="store_true", help="4096^3, 20 matmuls")
    gpu_common.add_flags(ap)
    args = ap.parse_args(argv)
    n = args.n or (256 if args.tiny else 4096 if args.quick else 8192)
    reps = args.reps or (3 if args.tiny else 20 if args.quick else 50)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)

    @jax.jit
    def chain(a, b):  # reps dependent matmuls in one program: no dispatch gaps between them
        def body(_, x):
            return (x @ b) * jnp.bfloat16(1.0 / n**0.5)
        return jax.lax.fori_loop(0, reps, body, a)

    t0 = time.perf_counter()
    compiled = chain.lower(a, b).compile()
    print(f"matmul {n}^3 bf16 on {jax.devices()[0].device_kind}: compile {time.perf_counter() - t0:.1f} s",
          flush=True)
    jax.block_until_ready(compiled(a, b))
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(a, b))
    sec = (time.perf_counter() - t0) / reps
    rate = 2 * n**3 / sec
    print(f"matmul {n}^3 bf16: {sec * 1e3:.3f} ms each ({reps} chained)  {rate / 1e12:.1f} TFLOP/s  "
          f"{gpu_common.mfu(rate, args)}  finite {bool(jnp.isfinite(out).all())}", flush=True)


if __name__ == "__main__":
    main()
