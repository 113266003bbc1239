"""CPU fp32 cost of one CS-CFG step, ours (three branches as one jitted batch-3 forward) against the official way
(three sequential batch-1 diffusers WanVACETransformer3DModel calls), and the wall time of a whole 20-step tiny
stylisation (Stylizer: text, VAE, sampler, decode); then, in a child process, the context-parallel rows.

    .venv/bin/python -m bench.sample [--reps 5] [--threads 2] [--latent 3x16x16] [--quick]
    .venv/bin/python -m bench.sample --only context [--devices 8] [--meshes "context=8;fsdp=2,context=4;..."]

Same random weights (converted from the torch model) and inputs; both sides get --threads CPUs. The step config
is a small Wan (D 512, 4 heads, FFN 2048, 8 layers, VACE after 0/2/4/6) at latent 3x16x16 (S = 192 tokens); the
prompt is 40 tokens and the null prompt 120, both padded to 512 as the pipelines do (we fold the padding exactly,
diffusers attends to all 512). Our step includes the guidance (APG) and the DPM++ update; the official one
adds a plain torch combination, whose cost is negligible next to three forwards.

Context-parallel rows (`--only context`, which sets XLA_FLAGS=--xla_force_host_platform_device_count=--devices
before JAX starts; a plain run starts it as a child process): our same step, same weights and inputs, on each
--meshes layout (each on the first devices it needs; weights sharded by `sharding.DEFAULT_RULES`, as
`Stylizer.load(mesh=...)` places them) against the same sampler on one device, timed in interleaved rounds. It
prints each layout's time ratio, the max abs and relative difference of its latents from one device's (over
--cp-tol: MISMATCH and a non-zero exit) and the load average. The simulated devices share this machine's cores and
their collectives are memory copies, so the ratios measure the sharded program's overhead, never a speed-up. With
4 heads, context=8 takes the ring (`wan.Options(context_parallel="auto")`), fsdp=2,context=4 Ulysses; fsdp=2
cannot split the 3 branches, so its two halves repeat the work (`sample.devices` says so).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def _median(fn, reps):
    import numpy as np

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(min(times))


def _step_case(args):
    """The step benchmark's model and inputs: (cfg, options, diffusers model, our params, (f, h, w), src, ctx, text,
    null, rng)."""
    import numpy as np

    from pickstyle_jax.models import wan
    from tests import wan_ref

    cfg = wan.WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, vace_layers=(0, 2, 4, 6), text_dim=4096)
    options = wan.Options(attention="chunked", attention_chunk=256)
    if args.quick:
        cfg = cfg.replace(num_layers=2, vace_layers=(0,))
    model = wan_ref.make_diffusers_vace(cfg, seed=0)
    params = wan_ref.flax_params_from_diffusers(model)
    f, h, w = (int(v) for v in args.latent.split("x"))
    r = np.random.default_rng(0)
    src = r.standard_normal((1, f, h, w, 16), dtype=np.float32)
    ctx = r.standard_normal((1, f, h, w, 96), dtype=np.float32)
    text = r.standard_normal((1, 40, cfg.text_dim), dtype=np.float32)
    null = r.standard_normal((1, 120, cfg.text_dim), dtype=np.float32)
    return cfg, options, model, params, (f, h, w), src, ctx, text, null, r


def bench_step(args):
    import jax
    import numpy as np

    from pickstyle_jax import sample
    from tests import wan_ref

    cfg, options, model, params, (f, h, w), src, ctx, text, null, r = _step_case(args)
    # one executed step of the 20-step grid (skip 19): the cost of a step of the loop
    sampler = sample.make_sampler(cfg, steps=20, skip=19, options=options)
    key = jax.random.key(0)
    ours = lambda: jax.block_until_ready(sampler(params, None, src, ctx, text, null, key))  # noqa: E731
    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0

    perm = ctx[:, r.permutation(f)][:, :, r.permutation(h)][:, :, :, r.permutation(w)]
    t = np.array([457.0], np.float32)

    def official():
        v_n = wan_ref.diffusers_forward(model, src, t, null, perm)
        v_c = wan_ref.diffusers_forward(model, src, t, text, ctx)
        v_nt = wan_ref.diffusers_forward(model, src, t, null, ctx)
        v = v_c + 4.0 * (v_c - v_nt) + 3.0 * (v_nt - v_n)  # the plain CS-CFG form
        return src - 0.4571 * v  # DPM++'s last step (sigma 0.4571 -> 0) is x - sigma * v

    official()
    for _ in range(1):  # warm both
        ours()
    med, mins = {}, {}
    for name, fn in (("ours", ours), ("official", official)):
        med[name], mins[name] = _median(fn, args.reps)
    print(f"step config D={cfg.dim} heads={cfg.num_heads} ffn={cfg.ffn_dim} layers={cfg.num_layers} "
          f"vace={cfg.vace_layers} latent {f}x{h}x{w} (S={f * h * w // 4}) text 40/120->512 threads={args.threads}")
    print(f"ours compile+first step {compile_s:.1f} s")
    for k in ("ours", "official"):
        print(f"{k:9s} one CS-CFG step: median {med[k] * 1e3:8.1f} ms (min {mins[k] * 1e3:.1f})  reps {args.reps}")
    print(f"ratio ours/official per step: median {med['ours'] / med['official']:.3f}, "
          f"min {mins['ours'] / mins['official']:.3f}")
    return med


def bench_context(args):
    """The step of `bench_step` (our sampler only, same weights and inputs) on each mesh of --meshes over simulated
    CPU devices against the same sampler on one device, timed interleaved; checks the outputs agree. Returns False
    when one does not (relative error over --cp-tol)."""
    import jax
    import numpy as np

    from pickstyle_jax import sample, sharding
    from pickstyle_jax.models import wan
    from pickstyle_jax.sample import devices

    load0 = os.getloadavg()
    cfg, options, _, params, (f, h, w), src, ctx, text, null, _ = _step_case(args)
    inputs = (src, ctx, text, null)
    key = jax.random.key(0)
    runs = {}  # name -> (run(), latents of the first call, compile + first call seconds, attention collective)

    def add(name, mesh):
        if mesh is None:
            put = lambda tree: jax.device_put(tree, jax.devices()[0])  # noqa: E731
            p = put(params)
        else:
            put = lambda tree: jax.device_put(tree, sharding.replicated(mesh))  # noqa: E731
            p = sharding.shard(params, wan.param_axes(cfg), mesh)  # weights split as the stylizer loads them
        a = put(inputs)
        k = put(key)
        sampler = sample.make_sampler(cfg, steps=20, skip=19, options=options, mesh=mesh)
        t0 = time.perf_counter()
        lowered = sampler.lower(p, None, *a, k)
        hlo = lowered.as_text()  # which context-parallel attention XLA got: Ulysses' all-to-all or the ring's permute
        how = "+".join(n for op, n in (("all_to_all", "Ulysses all-to-all"), ("collective_permute", "ring permute"))
                       if op in hlo) or "no token collective"
        compiled = lowered.compile()
        scales = dict(text_scale=sampler.text_scale, context_scale=sampler.context_scale)
        run = lambda: jax.block_until_ready(compiled(p, None, *a, k, **scales))  # noqa: E731
        out = np.asarray(run())
        runs[name] = run, out, time.perf_counter() - t0, how

    add("1 device", None)
    for spec in args.meshes.split(";"):
        sizes = [] if spec.strip() == "auto" else [int(kv.split("=")[1]) for kv in spec.split(",")]
        n = jax.device_count() if not sizes or -1 in sizes else int(np.prod(sizes))  # auto / -1: every device
        if n > jax.device_count():
            raise SystemExit(f"--meshes {spec}: needs {n} devices, this process has {jax.device_count()}; "
                             f"raise --devices")
        shape = devices.mesh_shape(spec, n, flag="--meshes")
        add(f"{spec} ({n} dev)", sharding.make_mesh(shape, jax.devices()[:n]))
    times = {name: [] for name in runs}
    for name, (run, *_) in runs.items():  # warm each once more
        run()
    for _ in range(args.reps):  # interleaved: every layout once per round, so load drifts hit them alike
        for name, (run, *_) in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    load1 = os.getloadavg()

    want = runs["1 device"][1]
    print(f"context-parallel step: the step above (D={cfg.dim} heads={cfg.num_heads} layers={cfg.num_layers}, latent "
          f"{f}x{h}x{w}, S={f * h * w // 4} tokens, 3 CS-CFG branches) on {jax.device_count()} simulated CPU devices "
          f"(XLA_FLAGS) vs 1 device, same weights and inputs, {args.reps} interleaved rounds, threads={args.threads}")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (1 min; {os.cpu_count()} cores on the machine)")
    ok = True
    base_med, base_min = np.median(times["1 device"]), min(times["1 device"])
    for name, (_, out, first, how) in runs.items():
        med, mn = float(np.median(times[name])), min(times[name])
        line = f"{name:28s} median {med * 1e3:8.1f} ms (min {mn * 1e3:.1f}), compile+first {first:.1f} s"
        if name != "1 device":
            line += f", {how}"
            rel = float(np.linalg.norm(out - want) / np.linalg.norm(want))
            bad = not rel <= args.cp_tol
            ok &= not bad
            line += (f"; vs 1 device: time x{med / base_med:.2f} median (x{mn / base_min:.2f} min), output max abs "
                     f"diff {np.max(np.abs(out - want)):.2e}, relative {rel:.2e}"
                     + (f"  MISMATCH (over {args.cp_tol:g})" if bad else ""))
        print(line)
    print(f"(the simulated devices share the same {args.threads} cores and their collectives are memory copies: "
          f"these ratios measure the overhead of the sharded program, not a speed-up)")
    return ok


def bench_stylize(args):
    import jax
    import numpy as np

    from pickstyle_jax import checkpoints, lora, sample
    from pickstyle_jax.models import umt5, vae, wan
    from tests import wan_ref

    cfg = wan.WanConfig.named("tiny").replace(text_dim=64)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as d:
        params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, dtype=np.float32), wan.param_shapes(cfg))
        checkpoints.save(f"{d}/dit", cfg, params, kind="wan")
        ad = lora.init(lora.LoraConfig(rank=4, alpha=4), wan.param_shapes(cfg), jax.random.key(0))
        checkpoints.save_lora(f"{d}/lora", jax.tree.map(lambda a: a + 0.01, ad))
        vcfg = vae.VaeConfig.named("tiny")
        vp = jax.tree_util.tree_map_with_path(
            lambda p, s: (rng.standard_normal(s, dtype=np.float32) / np.sqrt(np.prod(s[:-1]))
                          if p[-1].key == "kernel" else np.ones(s, np.float32) if p[-1].key == "scale"
                          else np.zeros(s, np.float32)),
            vae.param_shapes(vcfg), is_leaf=lambda x: isinstance(x, tuple))
        checkpoints.save(f"{d}/vae", vcfg, vp, kind="vae")
        tcfg = umt5.Umt5Config.named("tiny")
        checkpoints.save(f"{d}/umt5", tcfg, umt5.init(tcfg, jax.random.key(1)), kind="umt5")
        st = sample.Stylizer.load(dit=f"{d}/dit", vae=f"{d}/vae", umt5=f"{d}/umt5", tokenizer="bytes",
                                  lora=f"{d}/lora")
        kw = dict(steps=20, skip=4, max_frames=17)
        t0 = time.perf_counter()
        st(frames, "Anime style.", **kw)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, info = st.run(frames, "Anime style.", **kw)
        warm = time.perf_counter() - t0
    f, h, w = (17 - 1) // 4 + 1, 8, 8
    model = wan_ref.make_diffusers_vace(cfg, seed=0)
    x = rng.standard_normal((1, f, h, w, 16), dtype=np.float32)
    ctx = rng.standard_normal((1, f, h, w, 96), dtype=np.float32)
    text = rng.standard_normal((1, 16, cfg.text_dim), dtype=np.float32)
    t = np.array([900.0], np.float32)
    three = lambda: [wan_ref.diffusers_forward(model, x, t, text, ctx) for _ in range(3)]  # noqa: E731
    three()
    step, _ = _median(three, args.reps)
    print(f"tiny stylisation 17x64x64 -> latent {f}x{h}x{w}, 20 steps skip 4 (16 executed), CS-CFG + APG + LoRA: "
          f"first call (compiles) {cold:.2f} s, warm {warm:.3f} s (sampling {info['timing']['sample_s']:.3f} s)")
    print(f"official-way sampling loop at the same tiny config: 16 x 3 diffusers forwards = {16 * step:.3f} s; "
          f"ratio our warm sampling / official loop {info['timing']['sample_s'] / (16 * step):.3f}, "
          f"our whole warm stylisation / official loop {warm / (16 * step):.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latent", default="3x16x16")
    ap.add_argument("--quick", action="store_true", help="2-layer step config")
    ap.add_argument("--only", choices=("all", "step", "stylize", "context"), default="all",
                    help="all: step and stylize here, then context in a child process with --devices devices")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices of the context rows")
    ap.add_argument("--meshes", default="context=8;fsdp=2,context=4;data=3,context=2",
                    help="';'-separated --mesh layouts of the context rows (each on the first devices it needs)")
    ap.add_argument("--cp-tol", type=float, default=1e-4,
                    help="largest relative error (L2) of a layout's latents against one device's")
    args = ap.parse_args(argv)
    if args.only == "context":  # before JAX starts (nothing above imports it)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    if args.threads < len(os.sched_getaffinity(0)):  # XLA sizes its CPU thread pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.only == "context":
        if not bench_context(args):
            raise SystemExit("a context-parallel layout's latents differ from one device's (MISMATCH above)")
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.only in ("all", "step"):
        bench_step(args)
    if args.only in ("all", "stylize"):
        bench_stylize(args)
    if args.only == "all":  # the simulated devices need XLA_FLAGS before JAX starts: a fresh process
        sys.stdout.flush()
        child = [sys.executable, "-m", "bench.sample", *(sys.argv[1:] if argv is None else argv), "--only", "context"]
        subprocess.run(child, check=True)


if __name__ == "__main__":
    main()
