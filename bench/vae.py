"""VAE encode/decode on CPU: pickstyle_jax vs diffusers' AutoencoderKLWan at the same random weights.

    .venv/bin/python bench/vae.py [--base-dim 32] [--frames 17] [--size 128] [--batch 1] [--threads 2] [--reps 4]

Two phases, both pinned to the same `--threads` cores (torch threads = the cores JAX's CPU client sees):
  memory: each (library, op) in its own subprocess, so ru_maxrss (peak resident memory) is that run's alone. It
    includes the interpreter, the libraries and the weights, hence the "idle" row (imports + weights, no op); for
    JAX it also includes the compile.
  time: one process holding both models runs them alternately, rep by rep, so load from other processes on a shared
    machine hits both alike. The minimum and the median over `--reps` are printed; JAX's first call (with the
    compile) is not counted.
Outputs are compared against diffusers (relative L2).
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
LIBS = ("torch", "jax", "jax-nochunk")  # jax: chunked (the default path); jax-nochunk: the whole clip at once


def _make_weights(args, work: Path):
    """A randomised diffusers model saved as a folder, our conversion of it, and the inputs."""
    import torch
    from diffusers import AutoencoderKLWan

    from convert import wan_vae

    model = AutoencoderKLWan(base_dim=args.base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             attn_scales=[], temperal_downsample=[False, True, True])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("gamma"):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
    model.save_pretrained(work / "diffusers")
    wan_vae.convert(work / "diffusers", work / "ours", verbose=False)
    rng = np.random.default_rng(0)
    lat = 1 + (args.frames - 1) // 4
    np.save(work / "video.npy",
            rng.uniform(-1, 1, (args.batch, args.frames, args.size, args.size, 3)).astype(np.float32))
    np.save(work / "z.npy",
            rng.standard_normal((args.batch, lat, args.size // 8, args.size // 8, 16)).astype(np.float32))
    print("RESULT {}")


def _runner(lib: str, work: Path, threads: int):
    """run(op) -> numpy output, for one library, loaded from `work`."""
    video, z = np.load(work / "video.npy"), np.load(work / "z.npy")
    if lib == "torch":
        import torch
        from diffusers import AutoencoderKLWan

        torch.set_num_threads(threads)
        model = AutoencoderKLWan.from_pretrained(work / "diffusers").eval()
        mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)

        def run(op):
            with torch.no_grad():
                if op == "encode":
                    mu = model.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mode()
                    return ((mu - mean) / std).permute(0, 2, 3, 4, 1).numpy()
                out = model.decode(torch.from_numpy(z).permute(0, 4, 1, 2, 3) * std + mean).sample
                return out.permute(0, 2, 3, 4, 1).numpy()
        return run

    import jax

    from pickstyle_jax import checkpoints
    from pickstyle_jax.models import vae

    cfg, params = checkpoints.load_vae(work / "ours")
    chunked = lib == "jax"

    def run(op):
        if op == "encode":
            out = vae.encode(cfg, params, video, chunked=chunked)
        else:
            out = vae.decode(cfg, params, z, chunked=chunked)
        return np.asarray(jax.block_until_ready(out))
    return run


def _child_memory(args):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    run = _runner(args.lib, Path(args.work), args.threads)
    res = {"lib": args.lib, "op": args.op}
    if args.op != "idle":
        t0 = time.perf_counter()
        np.save(Path(args.work) / f"out_{args.lib}_{args.op}.npy", run(args.op))
        res["first_s"] = time.perf_counter() - t0
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def _child_time(args):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    runs = {lib: _runner(lib, Path(args.work), args.threads) for lib in args.libs.split(",")}
    times = {}
    for op in ("encode", "decode"):
        for run in runs.values():  # warm-up (JAX compiles)
            run(op)
        for _ in range(args.reps):
            for lib, run in runs.items():
                t0 = time.perf_counter()
                run(op)
                times.setdefault(f"{lib} {op}", []).append(time.perf_counter() - t0)
    print("RESULT " + json.dumps(times))


def _spawn(args_list, env):
    p = subprocess.run([sys.executable, __file__, "--child", *args_list], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{args_list} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dim", type=int, default=32)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--libs", default=",".join(LIBS), help="comma list of " + ", ".join(LIBS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--op", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = {"weights": lambda a: _make_weights(a, Path(a.work)), "time": _child_time}.get(args.op, _child_memory)
        return fn(args)

    libs = args.libs.split(",")
    # Linux carries a process's peak RSS across fork+exec into the child's ru_maxrss, so this parent stays light
    # (numpy only) and even the weights are made in a subprocess.
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["--work", str(work), "--threads", str(args.threads), "--reps", str(args.reps), "--base-dim",
                  str(args.base_dim), "--frames", str(args.frames), "--size", str(args.size), "--batch",
                  str(args.batch), "--libs", args.libs]
        _spawn(["--op", "weights", *common], env)
        mem = {(lib, op): _spawn(["--lib", lib, "--op", op, *common], env)
               for lib in libs for op in ("idle", "encode", "decode")}
        times = _spawn(["--op", "time", *common], env)
        errs = {}
        if "torch" in libs:
            for lib in libs:
                for op in ("encode", "decode"):
                    a, b = np.load(work / f"out_{lib}_{op}.npy"), np.load(work / f"out_torch_{op}.npy")
                    errs[lib, op] = np.linalg.norm(a - b) / np.linalg.norm(b)

    print(f"VAE base_dim {args.base_dim}, {args.batch}x{args.frames}x{args.size}x{args.size}, {args.threads} "
          f"threads/cores; time: min / median of {args.reps} interleaved runs; peak RSS per subprocess")
    print(f"{'lib':12s} {'op':7s} {'min s':>7s} {'median':>7s} {'peak MB':>8s} {'(idle MB)':>9s} "
          f"{'1st call s':>10s} {'rel L2 vs torch':>16s}")
    for lib in libs:
        for op in ("encode", "decode"):
            t, m = times[f"{lib} {op}"], mem[lib, op]
            err = f"{errs[lib, op]:.2e}" if (lib, op) in errs and lib != "torch" else ""
            print(f"{lib:12s} {op:7s} {min(t):7.3f} {np.median(t):7.3f} {m['peak_mb']:8.0f} "
                  f"{mem[lib, 'idle']['peak_mb']:9.0f} {m['first_s']:10.2f} {err:>16s}")
    if "torch" in libs:
        for lib in (x for x in libs if x != "torch"):
            for op in ("encode", "decode"):
                tj, tt = times[f"{lib} {op}"], times[f"torch {op}"]
                mj, mt = mem[lib, op]["peak_mb"], mem["torch", op]["peak_mb"]
                print(f"{lib} / torch {op}: time x{min(tj) / min(tt):.2f} (min) x{np.median(tj) / np.median(tt):.2f} "
                      f"(median); peak RSS x{mj / mt:.2f}, above idle {mj - mem[lib, 'idle']['peak_mb']:.0f} MB vs "
                      f"{mt - mem['torch', 'idle']['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
