"""CPU fp32 forward time of our jitted Wan VACE DiT against diffusers' WanVACETransformer3DModel.

Same random weights (converted from the torch model) and inputs; both get --threads CPUs (default 2; fewer pins
this process, since XLA sizes its pool from the affinity mask). Default config: D 512, 4 heads x 128, FFN 2048,
8 layers with VACE after layers 0/2/4/6, latent 5x32x32 (S = 1280), text padded to 512. Runs are interleaved and
both wall and process-CPU times are printed: on a shared machine torch's OpenMP threads degrade badly under
contention, so compare the 1-thread numbers too.

    .venv/bin/python -m bench.dit_forward [--reps 7] [--attention auto|chunked|xla] [--chunk 256] [--threads 2]

Two honest ratios, each against diffusers on the same weights and inputs:
  like-for-like: a prompt of 512 real tokens (nothing to fold), both attend to 512 text keys;
  real prompt:   a 40-token prompt zero-padded to 512 (what the pipelines hand the model), passed with its true
                 length (`text_lens`, as text.encode_text returns it); we fold the 472 identical padded rows into
                 one key with a log-count bias (exact), diffusers attends to all 512.
Default attention "auto" (chunked on CPU) with 256-query blocks: the [4, 256, 1280] logit blocks stay in cache.
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", default="auto", choices=("auto", "xla", "chunked"))
    ap.add_argument("--prompt-len", type=int, default=40, help="true length of the real-prompt case")
    ap.add_argument("--scan", action="store_true", help="scanned layers (stacked params)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--latent", default="5x32x32")
    args = ap.parse_args(argv)
    if args.threads < len(os.sched_getaffinity(0)):  # XLA sizes its CPU thread pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    import jax
    import numpy as np
    import torch

    from pickstyle_jax.models import wan
    from tests import wan_ref

    torch.set_num_threads(args.threads)
    cfg = wan.WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, vace_layers=(0, 2, 4, 6), text_dim=4096)
    opts = wan.Options(attention=args.attention, attention_chunk=args.chunk, scan_layers=args.scan)
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

    cases = {"like-for-like, 512 real text tokens": (r.standard_normal((1, 512, cfg.text_dim), dtype=np.float32),
                                                      None)}
    text = np.zeros((1, 512, cfg.text_dim), np.float32)
    text[:, :args.prompt_len] = r.standard_normal((1, args.prompt_len, cfg.text_dim))
    cases[f"real prompt, {args.prompt_len} tokens padded to 512, text_lens + fold"] = (
        text, np.array([args.prompt_len], np.int32))
    for name, (text, lens) in cases.items():
        run_jax = lambda: jax.block_until_ready(forward(cfg, params, x, t, text, ctx, text_lens=lens, options=opts))
        run_torch = lambda: wan_ref.diffusers_forward(model, x, t, text, ctx)
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


if __name__ == "__main__":
    main()
