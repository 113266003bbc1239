"""GPU timing of the real PickStyle LoRA training step (pickstyle_jax.train.step.train_step) on one accelerator.

Default: VACE-1.3B, bf16 backbone (params + compute), scan_layers=True, attention "auto" (cuDNN flash attention on
GPU), LoRA rank 128 on the VACE self-attention q/k/v (the training config's default), AdamW + global-norm clip, batch
1 of 81x480x832 uint8 clip pairs -> latents 21x60x104 -> 32,760 video tokens. The step is the training run's own
function, jitted with the base donated-never and the state donated: pixels to [-1, 1], fp32 VAE encode of target and
source (stop_gradient), context [E(0) | E(source) | ones], flow draw, DiT forward with LoRA, weighted MSE,
gradient w.r.t. the LoRA only, clip, AdamW. The step takes pixels (no latent-input variant), so the step
time includes the fp32 VAE encode of the two clips; that encode is also timed alone and printed, so the DiT part is
the difference. One row per remat policy ("full", then "offload" where the backend has pinned host memory).

Random weights: the DiT built with bench/gpu_dit.py's one-small-jit-per-shape generator, the VAE with
autoencoders.random_params (numpy), the LoRA with lora.init (B = 0, as a fresh run starts).

Useful FLOPs per step: pickstyle_jax.flops.train_step_flops, the count the trainer's logged MFU uses (2 per
multiply-add; 2 x forward + the attention core: the backbone is frozen, so the backward computes activation gradients
only; LoRA, the VAE encode and remat recompute not counted). MFU against the H100's 989 TFLOP/s dense bf16 peak and
the 790 TFLOP/s of an 8192^3 bf16 matmul (bench/gpu_common.py). The compile, the first step and each timed step are
printed as they are measured.

    python bench/gpu_train.py [--quick] [--reps 5] [--remat full,offload]
--quick: the real width with 4 main blocks at 17x240x416 (latents 5x30x52). --tiny: the "tiny" DiT + "tiny" VAE at
5x32x32 (a CPU smoke test of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import gpu_common  # noqa: E402
from bench.gpu_dit import _regular, random_params  # noqa: E402
from pickstyle_jax import conditioning, flops, flow, lora as lora_lib, sharding  # noqa: E402
from pickstyle_jax.models import autoencoders, vae, wan  # noqa: E402
from pickstyle_jax.train import step as train_step  # noqa: E402


def build(args):
    tiny = args.tiny
    wcfg = wan.WanConfig.named("tiny" if tiny else args.config, param_dtype="bfloat16")
    if args.quick and not tiny:
        wcfg = wcfg.replace(num_layers=4, vace_layers=tuple(v for v in wcfg.vace_layers if v < 4))
    opts = wan.Options(dtype="bfloat16", attention=args.attention,
                       scan_layers=wcfg.num_layers > 1 and _regular(wcfg))
    vcfg = vae.VaeConfig.named("tiny" if tiny else "wan2.1")
    lcfg = lora_lib.LoraConfig(rank=8 if tiny else args.rank, alpha=8.0 if tiny else float(args.rank))
    frames, height, width = (5, 32, 32) if tiny else (17, 240, 416) if args.quick else (81, 480, 832)
    return wcfg, opts, vcfg, lcfg, (frames, height, width)


def time_compiled(compiled, *call_args, reps, donate_state=None, report=None):
    """Median seconds of `reps` calls after one warm-up; donate_state threads the donated state through; report(i,
    seconds) is called after each call as it finishes (i = 0 is the warm-up)."""
    state = donate_state
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        if state is None:
            out = jax.block_until_ready(compiled(*call_args))
        else:
            state, metrics = compiled(call_args[0], state, *call_args[1:])
            out = jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t0)
        if report is not None:
            report(i, time.perf_counter() - t0)
    return float(np.median(times)), out


def peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30 or float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vace-1.3B")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", default="full,offload")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    gpu_common.add_flags(ap)
    args = ap.parse_args(argv)
    if args.tiny:
        args.remat = "full"
    reps = args.reps or (2 if args.quick or args.tiny else 5)
    wcfg, opts, vcfg, lcfg, (frames, height, width) = build(args)
    lat = (1 + (frames - 1) // vcfg.temporal_factor, height // vcfg.spatial_factor, width // vcfg.spatial_factor)
    tokens = lat[0] * (lat[1] // wcfg.patch_size[1]) * (lat[2] // wcfg.patch_size[2])
    fwd = flops.forward_flops(wcfg, tokens)
    attn = flops.attention_core_flops(wcfg, tokens)
    useful = flops.train_step_flops(wcfg, tokens, 1)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(wan.param_shapes(wcfg)))
    print(f"train step: DiT {args.config if wcfg.dim > 48 else 'tiny'} ({wcfg.num_layers}+{len(wcfg.vace_layers)} "
          f"blocks, {n_params / 1e9:.3f} B params bf16, scan_layers={opts.scan_layers}, attention={args.attention}->"
          f"{wan.layers.resolve_attention(args.attention, jnp.bfloat16)}), LoRA rank {lcfg.rank} on {lcfg.targets}; "
          f"batch 1 of {frames}x{height}x{width} pixels -> latents {lat[0]}x{lat[1]}x{lat[2]}, S = {tokens} tokens; "
          f"device {jax.devices()[0].device_kind}", flush=True)
    print(f"  useful FLOPs/step = 2 x forward + attention core = 2 x {fwd / 1e12:.4g} + {attn / 1e12:.4g} = "
          f"{useful / 1e12:.4g} TFLOP (frozen backbone: activation gradients only; VAE, LoRA, remat recompute not "
          f"counted)", flush=True)

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = sharding.normalize_rules(sharding.DEFAULT_RULES)
    t0 = time.perf_counter()
    dit = random_params(wcfg, jax.random.key(0), stacked=opts.scan_layers)
    vparams = jax.device_put(autoencoders.random_params(vcfg, 0))
    # One VAE executable serves E(zero clip) (the constant inactive context) and the timing of the step's encode.
    encode = jax.jit(functools.partial(vae.encode, vcfg))
    zeros = jnp.zeros((2, frames, height, width, 3), jnp.float32)
    t1 = time.perf_counter()
    encode_c = encode.lower(vparams, zeros).compile()
    vae_compile = time.perf_counter() - t1
    zero_latent = encode_c(vparams, zeros)[:1]
    base = {"dit": dit, "vae": vparams, "zero_latent": zero_latent}
    key = jax.random.key(1)
    lora_params = lora_lib.init(lcfg, wan.param_shapes(wcfg), jax.random.fold_in(key, 1)).params
    kb = jax.random.split(jax.random.fold_in(key, 2), 3)
    text = jax.random.normal(kb[0], (1, wcfg.text_len, wcfg.text_dim), jnp.float32)
    text = jnp.where(jnp.arange(wcfg.text_len)[None, :, None] < 120, text, 0.0)  # a 120-token prompt, zero padded
    batch = {"source": jax.random.randint(kb[1], (1, frames, height, width, 3), 0, 256, jnp.int32).astype(jnp.uint8),
             "target": jax.random.randint(kb[2], (1, frames, height, width, 3), 0, 256, jnp.int32).astype(jnp.uint8),
             "text": text, "text_lens": jnp.array([120], jnp.int32)}
    step_key = jax.random.key_data(jax.random.fold_in(key, 3))
    print(f"  weights + inputs ready in {time.perf_counter() - t0:.1f} s (VAE encode compile {vae_compile:.1f} s); "
          f"device peak so far {peak_gb():.1f} GiB", flush=True)

    for remat in args.remat.split(","):
        try:
            setup = train_step.StepConfig(wcfg, vcfg, lcfg, flow.Grid.make(5.0, 1000), 1,
                                          (5.6e-4, 0.9, 0.999, 1e-8, 0.01, 1.0), opts.replace(remat_policy=remat))
            state = train_step.init_state(setup, jax.tree.map(jnp.copy, lora_params))
            step = jax.jit(functools.partial(train_step.train_step, setup), donate_argnums=(1,))
            with sharding.rules_context(mesh, rules):
                t0 = time.perf_counter()
                compiled = step.lower(base, state, batch, step_key).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")
            print(f"  remat={remat}: compile {compile_s:.1f} s, temp {temp:.1f} GiB", flush=True)

            def report(i, sec, remat=remat):
                what = "first step (warm-up)" if i == 0 else f"step {i}/{reps}"
                print(f"  remat={remat}: {what} {sec:.3f} s  {useful / sec / 1e12:.3g} TFLOP/s  "
                      f"{gpu_common.mfu(useful / sec, args)}", flush=True)

            sec, (state, metrics) = time_compiled(compiled, base, batch, step_key, reps=reps, donate_state=state,
                                                  report=report)
            loss = float(metrics["loss"])
            print(f"RESULT train step remat={remat} S={tokens}: {sec:.3f} s (median of {reps})  {tokens / sec:.0f} "
                  f"tokens/s  {useful / sec / 1e12:.3g} TFLOP/s  {gpu_common.mfu(useful / sec, args)}  temp "
                  f"{temp:.1f} GiB  device peak {peak_gb():.1f} GiB (since start)  loss {loss:.4f}", flush=True)
            del state, compiled
        except Exception as e:  # noqa: BLE001 -- report the policy and go on
            print(f"  remat={remat:8s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            if args.verbose:
                traceback.print_exc()

    video = conditioning.pixels(jnp.concatenate([batch["target"], batch["source"]], axis=0))
    sec, _ = time_compiled(encode_c, vparams, video, reps=reps)
    print(f"  of which the fp32 VAE encode of the clip pair: {sec:.3f} s (median of {reps}; the DiT part of a step "
          f"is the difference)", flush=True)


if __name__ == "__main__":
    main()
