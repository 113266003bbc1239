"""GPU timing of one PickStyle stylisation (CS-CFG sampler) against its FLOP floor.

Default: VACE-1.3B, bf16 params + compute, scan_layers=True, attention "auto" (cuDNN on GPU), random weights (bench/
gpu_dit.py's one-small-jit-per-shape generator), a rank-128 LoRA on the VACE self-attention q/k/v with random A and
B (so the adapter path is exercised), batch 1 at 81x480x832 -> latents 21x60x104 (S = 32,760 tokens), 512 text rows
(prompt 120 tokens, negative prompt 126). The code path is `pickstyle_jax.sample.make_sampler(cfg, "dpm++", steps=20,
shift=16, skip=4, mode="cs_cfg", apg=True)`: ONE jitted call, a lax.scan over the 16 executed steps, each one DiT
forward over the 3 guidance branches batched (cond, null text, null text + permuted context), APG-guided CS-CFG
combination, DPM++ step. The VAE is not part of it (gpu_vae.py times that).

FLOP floor: 48 forwards (16 steps x 3 branches) x pickstyle_jax.flops.forward_flops at text_len 512 (2 FLOPs per
multiply-add; LoRA, guidance and solver arithmetic not counted). MFU = floor / (seconds x peak), against the H100's
989 TFLOP/s dense bf16 peak and the 790 TFLOP/s of an 8192^3 bf16 matmul (bench/gpu_common.py). The compile time,
the first run (the warm-up) and each timed run are printed as soon as they are measured: the first run alone gives
seconds per video if the time limit cuts the rest.

    python bench/gpu_sample.py [--quick] [--reps 2]
--quick: the real width with 4 main blocks at latents 5x30x52. --tiny: the "tiny" DiT at latents 2x4x4 and 4
sampling steps (skip 1), a CPU smoke test of this script.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import gpu_common  # noqa: E402
from bench.gpu_dit import _regular, random_params  # noqa: E402
from pickstyle_jax import guidance, lora as lora_lib, sample  # noqa: E402
from pickstyle_jax.flops import forward_flops  # noqa: E402
from pickstyle_jax.models import wan  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vace-1.3B")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--skip", type=int, default=None)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    gpu_common.add_flags(ap)
    args = ap.parse_args(argv)
    tiny = args.tiny
    steps = args.steps or (4 if tiny else 20)
    skip = args.skip if args.skip is not None else (1 if tiny else 4)
    reps = args.reps or (1 if args.quick or tiny else 2)
    cfg = wan.WanConfig.named("tiny" if tiny else args.config, param_dtype="bfloat16")
    if args.quick and not tiny:
        cfg = cfg.replace(num_layers=4, vace_layers=tuple(v for v in cfg.vace_layers if v < 4))
    opts = wan.Options(dtype="bfloat16", attention=args.attention,
                       scan_layers=cfg.num_layers > 1 and _regular(cfg))
    lat = (2, 4, 4) if tiny else (5, 30, 52) if args.quick else (21, 60, 104)
    tokens = lat[0] * (lat[1] // cfg.patch_size[1]) * (lat[2] // cfg.patch_size[2])
    n_exec, branches = steps - skip, guidance.MODES["cs_cfg"]
    floor = n_exec * branches * forward_flops(cfg, tokens)
    print(f"sampler: DiT {'tiny' if tiny else args.config} ({cfg.num_layers}+{len(cfg.vace_layers)} blocks, bf16, "
          f"scan_layers={opts.scan_layers}, attention={args.attention}->"
          f"{wan.layers.resolve_attention(args.attention, jnp.bfloat16)}), LoRA rank {args.rank if not tiny else 8}; "
          f"dpm++ {steps} steps skip {skip} cs_cfg+APG = {n_exec} steps x {branches} batched branches; latents "
          f"{lat[0]}x{lat[1]}x{lat[2]}, S = {tokens}; FLOP floor {n_exec * branches} forwards = {floor / 1e12:.3g} "
          f"TFLOP; device {jax.devices()[0].device_kind}", flush=True)

    t0 = time.perf_counter()
    params = random_params(cfg, jax.random.key(0), stacked=opts.scan_layers)
    rank = 8 if tiny else args.rank
    lcfg = lora_lib.LoraConfig(rank=rank, alpha=float(rank))
    adapters = lora_lib.init(lcfg, wan.param_shapes(cfg), jax.random.key(1))
    # B = 0 at init; give it values so the run is a trained adapter's, not an exact no-op.
    adapters = lora_lib.Lora(jax.tree.map(lambda a: a + 1e-3, adapters.params), lcfg)
    k = jax.random.split(jax.random.key(2), 4)
    src = jax.random.normal(k[0], (1, *lat, cfg.in_dim), jnp.float32)
    ctx = jax.random.normal(k[1], (1, *lat, cfg.vace_in_dim), jnp.float32)
    rows = jnp.arange(cfg.text_len)[None, :, None]
    text = jnp.where(rows < 120, jax.random.normal(k[2], (1, cfg.text_len, cfg.text_dim), jnp.float32), 0.0)
    null = jnp.where(rows < 126, jax.random.normal(k[3], (1, cfg.text_len, cfg.text_dim), jnp.float32), 0.0)
    lens = (jnp.array([min(120, cfg.text_len)], jnp.int32), jnp.array([min(126, cfg.text_len)], jnp.int32))
    key = jax.random.key(3)
    print(f"  weights + inputs ready in {time.perf_counter() - t0:.1f} s", flush=True)

    sampler = sample.make_sampler(cfg, solver="dpm++", steps=steps, shift=16.0, skip=skip, text_scale=5.0,
                                  context_scale=4.0, apg=True, mode="cs_cfg", options=opts)
    call = (params, adapters, src, ctx, text, null, key, *lens)
    t0 = time.perf_counter()
    compiled = sampler.lower(*call).compile() if hasattr(sampler, "lower") else None
    compile_s = time.perf_counter() - t0
    if compiled is not None:
        print(f"  compile {compile_s:.1f} s", flush=True)
    # jax's Compiled takes the traced guidance scales explicitly (the Sampler fills in its defaults itself)
    scales = dict(text_scale=sampler.text_scale, context_scale=sampler.context_scale)
    fn = functools.partial(compiled, **scales) if compiled is not None else sampler

    def line(what, sec):
        return (f"{what} {sec:.2f} s/video  {sec / n_exec:.3f} s/step  {floor / sec / 1e12:.3g} TFLOP/s  "
                f"{gpu_common.mfu(floor / sec, args)}")

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*call))  # warm-up (and the compile when the sampler has no .lower)
    first = time.perf_counter() - t0
    print(f"  {line('first run (warm-up' + (', compile included)' if compiled is None else ')'), first)}  output "
          f"finite {bool(jnp.isfinite(out).all())}", flush=True)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*call))
        times.append(time.perf_counter() - t0)
        print(f"  {line(f'run {i + 1}/{reps}', times[-1])}", flush=True)
    sec = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0) / 2**30 or float("nan")
    print(f"RESULT sampler S={tokens}: {line(f'median of {reps}:', sec)}  device peak {peak:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
