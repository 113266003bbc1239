"""CPU fp32 forward time of our jitted Wan VACE DiT against diffusers' WanVACETransformer3DModel.

Same random weights (converted from the torch model) and inputs; both get --threads CPUs (default 2; fewer pins
this process, since XLA sizes its pool from the affinity mask). Default config: D 512, 4 heads x 128, FFN 2048,
8 layers with VACE after layers 0/2/4/6, latent 5x32x32 (S = 1280), text padded to 512. Runs are interleaved and
both wall and process-CPU times are printed: on a shared machine torch's OpenMP threads degrade badly under
contention, so compare the 1-thread numbers too.

    .venv/bin/python -m bench.dit_forward [--reps 7] [--attention chunked|xla] [--chunk 256] [--threads 2]

Ours defaults to the query-chunked attention with 256-query blocks: on CPU the [4, 256, 1280] logit blocks stay
in cache and it beats the one-shot "xla" path by ~15%. The text is 40 tokens zero-padded to 512 (what the pipelines
do); we fold the 472 identical padded rows into one key with a log-count bias (exact, WanConfig.fold_text_padding),
diffusers attends to all 512. `--no-fold` turns that off for a like-for-like count of FLOPs.
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", default="chunked", choices=("xla", "chunked"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--no-fold", action="store_true", help="attend to all 512 padded text rows like diffusers")
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
    cfg = wan.WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, vace_layers=(0, 2, 4, 6), text_dim=4096,
                        attention=args.attention, attention_chunk=args.chunk, fold_text_padding=not args.no_fold)
    model = wan_ref.make_diffusers_vace(cfg, seed=0)
    params = wan_ref.flax_params_from_diffusers(model)
    f, h, w = (int(v) for v in args.latent.split("x"))
    r = np.random.default_rng(0)
    x = r.standard_normal((1, f, h, w, 16), dtype=np.float32)
    ctx = r.standard_normal((1, f, h, w, 96), dtype=np.float32)
    t = np.array([637.0], np.float32)
    text = r.standard_normal((1, 40, cfg.text_dim), dtype=np.float32)
    tokens = f * h * w // 4

    forward = jax.jit(wan.forward, static_argnums=0)
    run_jax = lambda: jax.block_until_ready(forward(cfg, params, x, t, text, ctx))
    run_torch = lambda: wan_ref.diffusers_forward(model, x, t, text, ctx)

    t0 = time.perf_counter()
    ours = np.asarray(run_jax())
    compile_s = time.perf_counter() - t0
    ref = run_torch()
    err = np.abs(ours - ref).max()
    run_jax()

    # Interleaved so background load hits both alike. CPU seconds (all threads of this process) are reported too:
    # on a shared machine they are the steadier measure of work done.
    times = {"jax": [], "torch": []}
    cpu = {"jax": [], "torch": []}
    for _ in range(args.reps):
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    cpu_med = {k: float(np.median(v)) for k, v in cpu.items()}
    print(f"config D={cfg.dim} heads={cfg.num_heads} ffn={cfg.ffn_dim} layers={cfg.num_layers} "
          f"vace={cfg.vace_layers} S={tokens} text 40->{cfg.text_len} attention={cfg.attention}"
          f"{f'/{cfg.attention_chunk}' if cfg.attention == 'chunked' else ''} "
          f"fold_text_padding={cfg.fold_text_padding} threads={args.threads}")
    print(f"jax compile+first run {compile_s:.1f} s; max |jax - torch| = {err:.2e}")
    for k in ("jax", "torch"):
        print(f"{k:6s} wall median {med[k] * 1e3:8.1f} ms (min {min(times[k]) * 1e3:.1f})   "
              f"cpu median {cpu_med[k] * 1e3:8.1f} ms (min {min(cpu[k]) * 1e3:.1f})   reps {args.reps}")
    print(f"ratio ours/torch: wall median {med['jax'] / med['torch']:.3f}, wall min "
          f"{min(times['jax']) / min(times['torch']):.3f}, cpu median {cpu_med['jax'] / cpu_med['torch']:.3f}")


if __name__ == "__main__":
    main()
