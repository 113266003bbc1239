"""VAE encode + decode at the PickStyle size (81x480x832, the real wan2.1 config, random weights) on one accelerator.

    python bench/gpu_vae.py                      # bf16 and fp32, chunked (the default path)
    python bench/gpu_vae.py --nochunk            # also the whole-clip path (may run out of memory)
    python bench/gpu_vae.py --quick              # tiny config, 9x32x48
    python bench/gpu_vae.py --tiny               # tiny config, 5x16x16, fp32 only: a CPU smoke test of this script
    python bench/gpu_vae.py --analyze            # compile only: XLA's buffer plan, any backend (CPU too)

Each (dtype, path, op) runs in its own subprocess so `memory_stats()["peak_bytes_in_use"]` (device peak since process
start) belongs to that op alone; it includes the weights (0.5 GB fp32 / 0.25 GB bf16) and the input. Where the
backend has no memory stats (CPU), peak host RSS is shown instead. Times: compile, then the median of `--reps` runs.
bf16 outputs are compared with fp32 ones (relative L2 over the latents and the first 9 decoded frames).
`--precision` sets jax_default_matmul_precision for the fp32 runs ("default" lets XLA use TF32 on NVIDIA GPUs, like
PyTorch's cuDNN default; "highest" is true fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU image has no install of this repository (the children get PYTHONPATH)


def _child(args):
    import jax
    import jax.numpy as jnp

    from pickstyle_jax.models import vae

    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", args.precision)
    cfg = vae.VaeConfig.named(args.config).replace(dtype=args.dtype)
    # Host-side random weights (numpy is ~instant; compiling vae.init's ~200 threefry draws is not), stored in the
    # compute dtype: bf16 halves the weights.
    rng = np.random.default_rng(0)

    def draw(path, s):
        x = rng.standard_normal(s, np.float32)
        leaf = path[-1].key
        x = x / np.sqrt(np.prod(s[:-1])) if leaf == "kernel" else (1 + 0.3 * x if leaf == "scale" else 0.1 * x)
        return jnp.asarray(x, args.dtype)

    params = jax.tree_util.tree_map_with_path(draw, vae.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    lat = (args.batch, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8, cfg.z_dim)
    k1, k2 = jax.random.split(jax.random.key(1))
    if args.op == "encode":
        x = jax.random.uniform(k1, (args.batch, args.frames, args.height, args.width, 3), jnp.float32, -1, 1)
        fn = jax.jit(lambda p, v: vae.encode(cfg, p, v, chunked=args.chunked))
    else:
        x = jax.random.normal(k2, lat, jnp.float32)
        fn = jax.jit(lambda p, v: vae.decode(cfg, p, v, chunked=args.chunked))
    t0 = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    out = np.asarray(jax.device_get(out[:, :9] if args.op == "decode" else out), np.float32)
    np.save(Path(args.work) / f"{args.op}_{args.dtype}_{args.chunked}.npy", out)
    res = {"device": str(jax.devices()[0].device_kind), "op": args.op, "dtype": args.dtype, "chunked": args.chunked,
           "compile_s": compile_s, "time_s": float(np.median(times)), "shape": list(out.shape),
           "finite": bool(np.isfinite(out).all()),
           "device_peak_gb": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
           "host_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print("RESULT " + json.dumps(res))


def _analyze(args):
    """Temp memory XLA plans for each path at the full size, from the compiled buffer assignment (runs nothing)."""
    import jax
    import jax.numpy as jnp

    from pickstyle_jax.models import vae

    for dtype in args.dtypes.split(","):
        cfg = vae.VaeConfig.named(args.config).replace(dtype=dtype)
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), vae.param_shapes(cfg),
                              is_leaf=lambda s: isinstance(s, tuple))
        lat = (args.batch, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8, cfg.z_dim)
        for op, fn, shape in (("encode", vae._encode, (args.batch, args.frames, args.height, args.width, 3)),
                              ("decode", vae._decode, lat)):
            for chunked in (True, False):
                m = fn.lower(cfg, params, jax.ShapeDtypeStruct(shape, jnp.float32), chunked).compile()
                m = m.memory_analysis()
                print(f"{jax.devices()[0].device_kind}: {op} {dtype} chunked={chunked!s:5s} "
                      f"{args.batch}x{args.frames}x{args.height}x{args.width} ({args.config}): planned temp "
                      f"{m.temp_size_in_bytes / 2**30:.2f} GiB + arguments {m.argument_size_in_bytes / 2**30:.2f} "
                      f"GiB + output {m.output_size_in_bytes / 2**30:.2f} GiB", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config, 9x32x48")
    ap.add_argument("--tiny", action="store_true", help="tiny config, 5x16x16, fp32 only (CPU smoke test)")
    ap.add_argument("--config", default="wan2.1")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--nochunk", action="store_true", help="also run the non-chunked (whole-clip) path")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", default="default", choices=("default", "high", "highest"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    ap.add_argument("--analyze", action="store_true", help="compile only and print XLA's planned memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--op", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--chunked", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.config, args.frames, args.height, args.width, args.reps = "tiny", 9, 32, 48, 2
    if args.tiny:
        args.config, args.frames, args.height, args.width, args.reps, args.dtypes = "tiny", 5, 16, 16, 1, "float32"
    if args.child:
        args.chunked = bool(args.chunked)
        return _child(args)
    if args.analyze:
        return _analyze(args)

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunked in ([1, 0] if args.nochunk else [1]):
            for dtype in args.dtypes.split(","):
                for op in ("encode", "decode"):
                    cmd = [sys.executable, __file__, "--child", "--op", op, "--dtype", dtype, "--chunked",
                           str(chunked), "--work", tmp, "--config", args.config, "--frames", str(args.frames),
                           "--height", str(args.height), "--width", str(args.width), "--batch", str(args.batch),
                           "--reps", str(args.reps), "--precision", args.precision]
                    try:
                        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                                           timeout=args.timeout)
                    except subprocess.TimeoutExpired:
                        print(f"{op} {dtype} chunked={bool(chunked)}: timed out after {args.timeout} s", flush=True)
                        continue
                    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                    if p.returncode or not line:
                        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                        print(f"{op} {dtype} chunked={bool(chunked)}: FAILED: {' | '.join(tail)[-600:]}", flush=True)
                        continue
                    r = json.loads(line[0][7:])
                    results.append(r)
                    mem = (f"device peak {r['device_peak_gb']:.2f} GiB" if r["device_peak_gb"] else
                           f"host peak {r['host_peak_gb']:.2f} GiB")
                    print(f"{r['device']}: {op:6s} {dtype:8s} chunked={bool(chunked)!s:5s} "
                          f"{args.batch}x{args.frames}x{args.height}x{args.width} ({args.config}): "
                          f"compile {r['compile_s']:.1f} s, run {r['time_s']:.3f} s, {mem}, out {r['shape']}, "
                          f"finite {r['finite']}", flush=True)
        for chunked in (True, False):
            for op in ("encode", "decode"):
                f32, b16 = (Path(tmp) / f"{op}_{d}_{chunked}.npy" for d in ("float32", "bfloat16"))
                if f32.exists() and b16.exists():
                    a, b = np.load(b16), np.load(f32)
                    print(f"bf16 vs fp32 {op} chunked={chunked}: rel L2 "
                          f"{np.linalg.norm(a - b) / np.linalg.norm(b):.2e}")
    if not results or not all(r["finite"] for r in results):
        sys.exit("some runs failed or produced non-finite values")


if __name__ == "__main__":
    main()
