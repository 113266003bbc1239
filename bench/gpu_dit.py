"""GPU timing of the Wan VACE DiT forward (bf16) per attention implementation, plus a bf16-vs-fp32 numerics check.

Default: VACE-1.3B, batch 1, latent 21x60x104 (S = 32,760 tokens, 81 frames at 480x832), text length 512,
random weights created on the device by a jitted init (never built on the host in fp32), bf16 params + compute.
Scanned layers (the real variants' default; --unrolled for the flat tree). For each attention implementation
("auto", "cudnn", "chunked", "xla") it prints compile time, ms/forward and achieved
TFLOP/s; an implementation that fails (e.g. "xla" materialising 12 x S x S fp32 logits = 51 GB) is reported and
skipped. Then, on a small random config, the bf16 forward against an fp32 ("highest" precision) forward, and
cuDNN attention against XLA attention on the same bf16 inputs.

FLOPs (2 per multiply-add), S video tokens, L = text_len, D width, F ffn_dim, per block:
    self-attention projections q,k,v,o   4 * 2*S*D^2
    self-attention scores + values       2 * 2*S^2*D
    cross-attention q,o projections      2 * 2*S*D^2
    cross-attention k,v projections      2 * 2*L*D^2
    cross-attention scores + values      2 * 2*S*L*D
    FFN                                  2 * 2*S*D*F
VACE blocks add after_proj 2*S*D^2 each and before_proj 2*S*D^2 once. Plus patch embeddings 2*S*(4*16 + 4*96)*D,
text MLP 2*L*(text_dim*D + D^2) and head 2*S*D*64; the time MLP is negligible.

    .venv/bin/python -m bench.gpu_dit [--quick] [--impls auto,cudnn,chunked,xla] [--reps 5] [--unrolled]
    .venv/bin/python -m bench.gpu_dit --config tiny --latent 2x4x4 --impls xla,chunked   # CPU smoke test
"""
from __future__ import annotations

import argparse
import functools
import math
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax.models import wan


def forward_flops(cfg: wan.WanConfig, tokens: int) -> float:
    s, d, f, length = tokens, cfg.dim, cfg.ffn_dim, cfg.text_len
    block = (8 * s * d * d + 4 * s * s * d + 4 * s * d * d + 4 * length * d * d + 4 * s * length * d + 4 * s * d * f)
    n_vace = len(cfg.vace_layers)
    patch = math.prod(cfg.patch_size)
    total = (cfg.num_layers + n_vace) * block + n_vace * 2 * s * d * d + (2 * s * d * d if n_vace else 0)
    total += 2 * s * patch * (cfg.in_dim + (cfg.vace_in_dim if n_vace else 0)) * d
    total += 2 * length * (cfg.text_dim * d + d * d) + 2 * s * d * patch * cfg.out_dim
    return float(total)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_leaf(key, shape, dtype, kind):
    z = jax.random.normal(key, shape, jnp.float32)
    v = z / math.sqrt(shape[-2]) if kind == "kernel" else 1.0 + 0.1 * z if kind == "scale" else 0.1 * z
    return v.astype(dtype)


def random_params(cfg: wan.WanConfig, key, stacked: bool = False):
    """Every leaf random (zero-init layers would hide numerics): kernels N(0, 1/in), norm scales 1 + N(0, 0.1^2),
    everything else N(0, 0.1^2); created on the device in cfg.param_dtype. One small jitted generator per distinct
    (shape, kind): a single jit over all ~1,000 leaves spends minutes compiling random-number code."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(wan.param_shapes(cfg, stacked=stacked))
    out = []
    for (path, sds), k in zip(leaves, jax.random.split(key, len(leaves))):
        name = getattr(path[-1], "key", "")
        kind = name if name in ("kernel", "scale") else "other"
        out.append(_random_leaf(k, tuple(sds.shape), sds.dtype, kind))
    return jax.tree_util.tree_unflatten(treedef, out)


def make_inputs(cfg, latent, key):
    f, h, w = latent
    kx, kc, kt = jax.random.split(key, 3)
    x = jax.random.normal(kx, (1, f, h, w, cfg.in_dim), jnp.float32)
    ctx = jax.random.normal(kc, (1, f, h, w, cfg.vace_in_dim), jnp.float32) if cfg.has_vace else None
    text = jax.random.normal(kt, (1, cfg.text_len, cfg.text_dim), jnp.float32)
    return x, jnp.array([637.0], jnp.float32), text, ctx


def time_forward(cfg, params, inputs, reps, options=None):
    fn = jax.jit(wan.forward, static_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(cfg, params, *inputs, options=options).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, *inputs))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, *inputs))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    temp_gb = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
    return compile_s, float(np.median(times)), temp_gb


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
        try:
            compile_s, sec, temp_gb = time_forward(cfg, params, inputs, args.reps, opts.replace(attention=impl))
            impl = f"{impl}->{wan.layers.resolve_attention(impl, jnp.bfloat16)}" if impl == "auto" else impl
            print(f"  attention={impl:8s} {sec * 1e3:9.1f} ms/forward  {flops / sec / 1e12:7.1f} TFLOP/s  "
                  f"(compile {compile_s:.0f} s, temp {temp_gb:.1f} GiB)", flush=True)
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
    cfg = wan.WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, vace_layers=(0, 2), text_dim=256)
    params = random_params(cfg, jax.random.key(2))
    inputs = make_inputs(cfg, (3, 16, 16), jax.random.key(3))
    fwd = jax.jit(wan.forward, static_argnums=0)
    with jax.default_matmul_precision("highest"):  # a true fp32 reference (TF32 otherwise on GPU)
        ref = fwd(cfg, params, *inputs)
    cfg16, opts16 = cfg.replace(param_dtype="bfloat16"), wan.Options.default(dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    out = fwd(cfg16, params16, *inputs, options=opts16)
    cos = float(jnp.vdot(out, ref) / (jnp.linalg.norm(out) * jnp.linalg.norm(ref)))
    print(f"numerics (D 256, 2x128 heads, 4+2 blocks, S 192): bf16 vs fp32 rel L2 {rel_l2(out, ref):.2e}, "
          f"cosine {cos:.6f}", flush=True)
    for impl in ("chunked", "cudnn"):
        try:
            other = fwd(cfg16, params16, *inputs, options=opts16.replace(attention=impl, attention_chunk=64))
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
    args = ap.parse_args(argv)
    args.latent = args.latent or ("5x30x52" if args.quick else "21x60x104")
    args.reps = args.reps or (2 if args.quick else 5)
    args.layers = args.layers or (4 if args.quick else None)
    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    if not args.skip_numerics:  # first: cheap, and the bf16 check must not be lost if a big case runs out of memory
        check_numerics(args)
    bench_speed(args)


if __name__ == "__main__":
    main()
