"""CPU fp32 forward time of our jitted Wan VACE DiT against diffusers' WanVACETransformer3DModel.

Same random weights (converted from the torch model) and inputs; both get --threads CPUs (default 2; fewer pins
this process, since XLA sizes its pool from the affinity mask). Default config: D 512, 4 heads x 128, FFN 2048,
8 layers with VACE after layers 0/2/4/6, latent 5x32x32 (S = 1280). Runs are interleaved (both sides see the same
background load) and both wall and process-CPU times are printed, median and min of --reps; on a shared machine
torch's OpenMP threads degrade badly under contention, so compare the 1-thread numbers too (--threads 1).

    .venv/bin/python -m bench.dit_forward [--reps 7] [--threads 2] [--attention ...] [--chunk N] [--scan]

The path measured is the one a user gets: `wan.Options.default("cpu")` (attention "auto" = chunked, its default
query block) on the flat tree a converted checkpoint loads as; --attention / --chunk / --scan override single
options. Two honest ratios, each against diffusers on the same weights and inputs:
  like-for-like: a prompt of 512 real tokens (nothing to fold), both attend to 512 text keys;
  real prompt:   a 40-token prompt as the stylizer hands it to the model (`Stylizer.encode_prompt`: the umT5 rows cut
                 to the power-of-two bucket holding it, 64, with its true length in `text_lens`); we fold the 472
                 zero rows of the 512 into one key with a log-count bias (exact), diffusers attends to all 512.
The last line is one `RESULT` line: both ratios (wall min of reps and median, CPU-time min) and the load average
before and after (with a warning first when other work kept the cores busy).
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", default=None, choices=("auto", "xla", "chunked"), help="default: the CPU default")
    ap.add_argument("--prompt-len", type=int, default=40, help="true length of the real-prompt case")
    ap.add_argument("--scan", action="store_true", help="scanned layers (stacked params)")
    ap.add_argument("--chunk", type=int, default=None, help="query block; default: the CPU default")
    ap.add_argument("--latent", default="5x32x32")
    args = ap.parse_args(argv)
    if args.threads < len(os.sched_getaffinity(0)):  # XLA sizes its CPU thread pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    import jax
    import numpy as np
    import torch

    from pickstyle_jax import text as text_lib
    from pickstyle_jax.models import wan
    from tests import wan_ref

    load_before = os.getloadavg()

    torch.set_num_threads(args.threads)
    cfg = wan.WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, vace_layers=(0, 2, 4, 6), text_dim=4096)
    overrides = {k: v for k, v in (("attention", args.attention), ("attention_chunk", args.chunk)) if v is not None}
    opts = wan.Options.default("cpu", scan_layers=args.scan, **overrides)
    model = wan_ref.make_diffusers_vace(cfg, seed=0)
    params = wan_ref.flax_params_from_diffusers(model)
    if args.scan:
        params = wan.stack_layers(cfg, params)
    f, h, w = (int(v) for v in args.latent.split("x"))
    r = np.random.default_rng(0)
    x = r.standard_normal((1, f, h, w, 16), dtype=np.float32)
    ctx = r.standard_normal((1, f, h, w, 96), dtype=np.float32)
    t = np.array([637.0], np.float32)
    tokens = f * h * w // 4
    forward = jax.jit(wan.forward, static_argnums=0)
    print(f"config D={cfg.dim} heads={cfg.num_heads} ffn={cfg.ffn_dim} layers={cfg.num_layers} vace={cfg.vace_layers} "
          f"S={tokens} attention={opts.attention} (-> {wan.layers.resolve_attention(opts.attention, np.float32)}"
          f"/{opts.attention_chunk}) scan_layers={opts.scan_layers} threads={args.threads}")

    full = r.standard_normal((1, 512, cfg.text_dim), dtype=np.float32)
    cases = {"like-for-like, 512 real text tokens": (full, None, full)}  # (ours, text_lens, diffusers' text)
    text = np.zeros((1, 512, cfg.text_dim), np.float32)
    text[:, :args.prompt_len] = r.standard_normal((1, args.prompt_len, cfg.text_dim))
    rows = text_lib.bucket_length(args.prompt_len, cfg.text_len)  # what Stylizer.encode_prompt passes
    cases[f"real prompt, {args.prompt_len} tokens in a {rows}-row bucket, text_lens + fold"] = (
        text[:, :rows], np.array([args.prompt_len], np.int32), text)
    ratios = []
    for name, (text, lens, text_512) in cases.items():
        run_jax = lambda: jax.block_until_ready(forward(cfg, params, x, t, text, ctx, text_lens=lens, options=opts))
        run_torch = lambda: wan_ref.diffusers_forward(model, x, t, text_512, ctx)
        t0 = time.perf_counter()
        ours = np.asarray(run_jax())
        compile_s = time.perf_counter() - t0
        err = np.abs(ours - run_torch()).max()
        run_jax()
        # interleaved so background load hits both alike; process CPU seconds are the steadier measure
        times = {"jax": [], "torch": []}
        cpu = {"jax": [], "torch": []}
        for _ in range(args.reps):
            for k, fn in (("jax", run_jax), ("torch", run_torch)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        cpu_med = {k: float(np.median(v)) for k, v in cpu.items()}
        print(f"== {name}: jax compile+first run {compile_s:.1f} s; max |jax - torch| = {err:.2e}")
        for k in ("jax", "torch"):
            print(f"   {k:6s} wall median {med[k] * 1e3:8.1f} ms (min {min(times[k]) * 1e3:.1f})   "
                  f"cpu median {cpu_med[k] * 1e3:8.1f} ms (min {min(cpu[k]) * 1e3:.1f})   reps {args.reps}")
        print(f"   ratio ours/torch: wall median {med['jax'] / med['torch']:.3f}, wall min "
              f"{min(times['jax']) / min(times['torch']):.3f}, cpu median {cpu_med['jax'] / cpu_med['torch']:.3f}",
              flush=True)
        ratios.append((min(times["jax"]) / min(times["torch"]), med["jax"] / med["torch"],
                       min(cpu["jax"]) / min(cpu["torch"])))
    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > os.cpu_count() - 0.5:
        print(f"warning: other processes keep the {os.cpu_count()} cores busy (load average above); torch's OpenMP "
              f"threads spin under contention, so its wall time is inflated: rerun on idle cores, or compare "
              f"--threads 1 and the CPU-time ratios", flush=True)
    load = lambda v: "/".join(f"{a:.1f}" for a in v)
    (lf_min, lf_med, lf_cpu), (rp_min, rp_med, rp_cpu) = ratios
    print(f"RESULT dit_forward ours/diffusers wall min of {args.reps} (median; CPU-time min): like-for-like "
          f"{lf_min:.3f} ({lf_med:.3f}; {lf_cpu:.3f}), real prompt {rp_min:.3f} ({rp_med:.3f}; {rp_cpu:.3f}); "
          f"attention {opts.attention}/{opts.attention_chunk}, threads {args.threads}, {os.cpu_count()} cores, load "
          f"average 1/5/15 min before {load(load_before)}, after {load(load_after)}", flush=True)


if __name__ == "__main__":
    main()
