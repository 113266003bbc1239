"""Ahead-of-time compile time and XLA's planned memory of the DiT forward + LoRA gradient, unrolled vs scanned.

Nothing is allocated: params, adapters and inputs are jax.ShapeDtypeStruct, `jax.jit(...).lower(...).compile()`
plans the program and `compiled.memory_analysis()` reports its temporary and argument bytes. XLA:CPU's loop-invariant
code motion is off, as in `python -m pickstyle_jax.plan` (pickstyle_jax/plan.py says why). Default: batch 1,
bf16 params and compute, latent 21x60x104 (32,760 tokens, 81 frames at 480x832), text of 512 rows, chunked
attention, remat "full", LoRA rank 128 on the VACE self-attention q/k/v (PickStyle's training setting).

    .venv/bin/python -m bench.compile                                   # vace-1.3B unrolled + scanned
    .venv/bin/python -m bench.compile --models vace-14B --modes scan
    .venv/bin/python -m bench.compile --models vace-1.3B --modes scan --remat offload --forward-only
    .venv/bin/python -m bench.compile --modes scan --remat subblock --ffn-chunk 4096   # the memory levers
"""
from __future__ import annotations

import argparse
import os
import time

from pickstyle_jax.plan import HOST_PLAN_FLAGS

if "--xla_disable_hlo_passes" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts: pickstyle_jax/plan.py
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_PLAN_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pickstyle_jax import lora  # noqa: E402
from pickstyle_jax.models import wan  # noqa: E402


def compile_one(name, scan, args):
    cfg = wan.WanConfig.named(name, param_dtype="bfloat16")
    opts = wan.Options(dtype="bfloat16", attention=args.attention, attention_chunk=args.chunk,
                       attention_kv_chunk=args.kv_chunk, remat_policy=args.remat, ffn_chunk=args.ffn_chunk,
                       scan_layers=scan)
    if args.layers:  # the first N main blocks only (how the plan grows with depth)
        cfg = cfg.replace(num_layers=args.layers, vace_layers=tuple(v for v in cfg.vace_layers if v < args.layers))
    f, h, w = (int(v) for v in args.latent.split("x"))
    sds = jax.ShapeDtypeStruct
    params = wan.param_shapes(cfg, stacked=scan)
    flat = wan.param_shapes(cfg)
    lcfg = lora.LoraConfig(rank=args.rank, alpha=float(args.rank))
    adapters = jax.eval_shape(lambda k: lora.init(lcfg, flat, k), jax.random.key(0))
    x = sds((args.batch, f, h, w, cfg.in_dim), jnp.float32)
    ctx = sds((args.batch, f, h, w, cfg.vace_in_dim), jnp.float32) if cfg.has_vace else None
    t = sds((args.batch,), jnp.float32)
    text = sds((args.batch, cfg.text_len, cfg.text_dim), jnp.float32)

    def loss(p, a, x, t, text, ctx):
        return jnp.mean(jnp.square(wan.forward(cfg, p, x, t, text, ctx, lora=a, options=opts)))

    fn = loss if args.forward_only else jax.grad(loss, argnums=1)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(params, adapters, x, t, text, ctx)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    gb = lambda n: n / 1e9
    what = "forward" if args.forward_only else "forward+LoRA grad"
    print(f"{name:10s} L={cfg.num_layers:2d} {'scanned' if scan else 'unrolled':8s} {what}: lower {t1 - t0:6.1f} s, compile "
          f"{t2 - t1:6.1f} s; temp {gb(mem.temp_size_in_bytes):7.2f} GB, arguments "
          f"{gb(mem.argument_size_in_bytes):6.2f} GB, output {gb(mem.output_size_in_bytes):5.2f} GB, host temp "
          f"{gb(getattr(mem, 'host_temp_size_in_bytes', 0)):5.2f} GB", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vace-1.3B", help="comma-separated WanConfig names")
    ap.add_argument("--modes", default="unroll,scan", help="comma-separated: unroll, scan")
    ap.add_argument("--latent", default="21x60x104")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--attention", default="chunked")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--kv-chunk", type=int, default=0, help="key block of the chunked attention (0: all keys)")
    ap.add_argument("--remat", default="full", help="remat policy (wan_options.REMAT_POLICIES)")
    ap.add_argument("--ffn-chunk", type=int, default=0, help="FFN token group (wan.Options.ffn_chunk; 0: all)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N main blocks")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; latent {args.latent}, batch {args.batch}, bf16, "
          f"attention {args.attention}/{args.chunk}/kv {args.kv_chunk}, remat {args.remat}, ffn_chunk "
          f"{args.ffn_chunk}", flush=True)
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            if mode not in ("unroll", "scan"):
                raise SystemExit(f"unknown mode {mode!r}: use unroll or scan")
            compile_one(name, mode == "scan", args)


if __name__ == "__main__":
    main()
