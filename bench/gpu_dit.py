"""GPU timing of the Wan VACE DiT forward (bf16) per attention implementation, plus a bf16-vs-fp32 numerics check.

Default: VACE-1.3B, batch 1, latent 21x60x104 (S = 32,760 tokens, 81 frames at 480x832), text length 512,
random weights created on the device by a jitted init (never built on the host in fp32), bf16 params + compute.
Scanned layers (the real variants' default; --unrolled for the flat tree). For each attention implementation
("auto", "cudnn", "chunked", "xla") it prints compile time, ms/forward and achieved
TFLOP/s; an implementation that fails (e.g. "xla" materialising 12 x S x S fp32 logits = 51 GB) is reported and
skipped. Each line is printed as soon as it is measured. First, on a small random config, the bf16 forward
against an fp32 ("highest" precision) forward, and cuDNN attention against XLA attention on the same bf16 inputs.

FLOPs: pickstyle_jax.flops.forward_flops (2 per multiply-add; projections, FFN, self/cross attention, embeddings,
head); MFU against the H100's 989 TFLOP/s dense bf16 peak and the 790 TFLOP/s of an 8192^3 bf16 matmul
(bench/gpu_common.py).

    python bench/gpu_dit.py [--quick] [--impls auto,cudnn,chunked,xla] [--reps 5] [--unrolled]
    python bench/gpu_dit.py --tiny          # the tiny config at latents 2x4x4: a CPU smoke test of this script
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the GPU image has no install of this repository

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import gpu_common  # noqa: E402
from pickstyle_jax.flops import forward_flops  # noqa: E402
from pickstyle_jax.models import wan  # noqa: E402


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaf(key, shape, dtype, kind):
    z = jax.random.normal(key, shape, jnp.float32)
    v = z / math.sqrt(shape[-2]) if kind == "kernel" else 1.0 + 0.1 * z if kind == "scale" else 0.1 * z
    return v.astype(dtype)


def random_params(cfg: wan.WanConfig, key, stacked: bool = False):
    """Every leaf random (zero-init layers would hide numerics): kernels N(0, 1/in), norm scales 1 + N(0, 0.1^2),
    everything else N(0, 0.1^2), in cfg.param_dtype. Large models are created on the device, one small jitted
    generator per distinct (shape, kind): a single jit over all ~1,000 leaves spends minutes compiling random-number
    code, and the host would build them in fp32. Small ones (under 16 M values) are drawn with numpy, which needs
    no compile at all."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(wan.param_shapes(cfg, stacked=stacked))
    on_host = sum(math.prod(sds.shape) for _, sds in leaves) < 2**24
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    out = []
    for (path, sds), k in zip(leaves, jax.random.split(key, len(leaves))):
        name = getattr(path[-1], "key", "")
        kind = name if name in ("kernel", "scale") else "other"
        if on_host:
            z = rng.standard_normal(sds.shape, np.float32)
            v = z / math.sqrt(sds.shape[-2]) if kind == "kernel" else 1.0 + 0.1 * z if kind == "scale" else 0.1 * z
            out.append(jnp.asarray(v, sds.dtype))
        else:
            out.append(_random_leaf(k, tuple(sds.shape), sds.dtype, kind))
    return jax.tree_util.tree_unflatten(treedef, out)


def make_inputs(cfg, latent, key):
    f, h, w = latent
    kx, kc, kt = jax.random.split(key, 3)
    x = jax.random.normal(kx, (1, f, h, w, cfg.in_dim), jnp.float32)
    ctx = jax.random.normal(kc, (1, f, h, w, cfg.vace_in_dim), jnp.float32) if cfg.has_vace else None
    text = jax.random.normal(kt, (1, cfg.text_len, cfg.text_dim), jnp.float32)
    return x, jnp.array([637.0], jnp.float32), text, ctx


def time_forward(cfg, params, inputs, reps, options, label, flops, args):
    """Compiles and times one forward, printing the compile line, the first run and each timed run as they come;
    returns the median seconds."""
    fn = jax.jit(functools.partial(wan.forward, cfg, options=options))
    t0 = time.perf_counter()
    compiled = fn.lower(params, *inputs).compile()
    mem = compiled.memory_analysis()
    temp_gb = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
    print(f"  attention={label}: compile {time.perf_counter() - t0:.1f} s, temp {temp_gb:.1f} GiB", flush=True)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, *inputs))
    print(f"  attention={label}: first run {time.perf_counter() - t0:.3f} s", flush=True)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, *inputs))
        times.append(time.perf_counter() - t0)
        print(f"  attention={label}: run {i + 1}/{reps} {times[-1] * 1e3:9.1f} ms  {flops / times[-1] / 1e12:7.1f} "
              f"TFLOP/s  {gpu_common.mfu(flops / times[-1], args)}", flush=True)
    return float(np.median(times))


def bench_speed(args):
    cfg = wan.WanConfig.named(args.config, param_dtype="bfloat16")
    if args.layers:  # fewer blocks of the real width (a smoke test of the script, or a smaller device)
        cfg = cfg.replace(num_layers=args.layers, vace_layers=tuple(v for v in cfg.vace_layers if v < args.layers))
    opts = wan.Options(dtype="bfloat16", attention_chunk=args.chunk,
                       scan_layers=not args.unrolled and cfg.num_layers > 1 and _regular(cfg))
    latent = tuple(int(v) for v in args.latent.split("x"))
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(wan.param_shapes(cfg)))
    flops = forward_flops(cfg, tokens)
    print(f"{args.config}: scan_layers={opts.scan_layers}, {n_params / 1e9:.3f} B params (bf16), latent {latent}, "
          f"S = {tokens}, "
          f"{flops / 1e12:.1f} TFLOP per forward, device {jax.devices()[0].device_kind}", flush=True)
    params = random_params(cfg, jax.random.key(0), stacked=opts.scan_layers)
    inputs = make_inputs(cfg, latent, jax.random.key(1))
    for impl in args.impls.split(","):
        label = f"{impl}->{wan.layers.resolve_attention(impl, jnp.bfloat16)}" if impl == "auto" else impl
        try:
            sec = time_forward(cfg, params, inputs, args.reps, opts.replace(attention=impl), label, flops, args)
            print(f"RESULT forward attention={label} S={tokens}: {sec * 1e3:.1f} ms/forward (median of {args.reps})  "
                  f"{flops / sec / 1e12:.1f} TFLOP/s  {gpu_common.mfu(flops / sec, args)}", flush=True)
        except Exception as e:  # noqa: BLE001 -- report and go on to the next implementation
            print(f"  attention={impl:8s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            if args.verbose:
                traceback.print_exc()


def _regular(cfg):
    try:
        wan.scan_period(cfg)
        return True
    except ValueError:
        return False


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_numerics(args):
    if args.tiny:
        cfg, latent = wan.WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, vace_layers=(0,), text_dim=32,
                                    text_len=16), (2, 4, 4)
    else:
        cfg, latent = wan.WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, vace_layers=(0, 2),
                                    text_dim=256), (3, 16, 16)
    params = random_params(cfg, jax.random.key(2))
    inputs = make_inputs(cfg, latent, jax.random.key(3))
    where = (f"D {cfg.dim}, {cfg.num_heads}x{cfg.dim // cfg.num_heads} heads, {cfg.num_layers}+{len(cfg.vace_layers)} "
             f"blocks, S {latent[0] * latent[1] * latent[2] // 4}")
    fwd = jax.jit(wan.forward, static_argnums=0)
    with jax.default_matmul_precision("highest"):  # a true fp32 reference (TF32 otherwise on GPU)
        ref = fwd(cfg, params, *inputs)
    cfg16, opts16 = cfg.replace(param_dtype="bfloat16"), wan.Options.default(dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    out = fwd(cfg16, params16, *inputs, options=opts16)
    cos = float(jnp.vdot(out, ref) / (jnp.linalg.norm(out) * jnp.linalg.norm(ref)))
    print(f"numerics ({where}): bf16 vs fp32 rel L2 {rel_l2(out, ref):.2e}, "
          f"cosine {cos:.6f}", flush=True)
    for impl in ("chunked", "cudnn"):
        try:
            chunked = opts16.replace(attention=impl, attention_chunk=4 if args.tiny else 64)
            other = fwd(cfg16, params16, *inputs, options=chunked)
            print(f"  bf16 attention={impl} vs xla: rel L2 {rel_l2(other, out):.2e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  bf16 attention={impl} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vace-1.3B")
    ap.add_argument("--latent", default=None, help="FxHxW latent (default 21x60x104; --quick: 5x30x52)")
    ap.add_argument("--impls", default="auto,chunked,xla")
    ap.add_argument("--unrolled", action="store_true", help="the flat tree, blocks unrolled")
    ap.add_argument("--chunk", type=int, default=2048, help="query block of the chunked implementation")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N main blocks (--quick: 4)")
    ap.add_argument("--quick", action="store_true", help="smaller latent, 4 blocks, 2 reps")
    ap.add_argument("--skip-numerics", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    gpu_common.add_flags(ap)
    args = ap.parse_args(argv)
    if args.tiny:
        args.config, args.latent, args.impls = "tiny", args.latent or "2x4x4", "auto"
    args.latent = args.latent or ("5x30x52" if args.quick else "21x60x104")
    args.reps = args.reps or (2 if args.quick or args.tiny else 5)
    args.layers = args.layers or (4 if args.quick else None)
    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    if not args.skip_numerics:  # first: cheap, and the bf16 check must not be lost if a big case runs out of memory
        check_numerics(args)
    bench_speed(args)


if __name__ == "__main__":
    main()
