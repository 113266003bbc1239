"""The GPU check cannot rot: every bench/gpu_*.py script runs at tiny sizes (`--tiny`) on the CPU, in a Python
environment shaped like the GPU image (jax, flax, optax, orbax-checkpoint, numpy, torch and their dependencies only:
no grain, ml_collections, imageio, sentencepiece, no install of this repository), from outside the repository and
with no PYTHONPATH, and each prints its result lines. bench/gpu.sh, which strings them together, is run with a
stand-in interpreter: the flags, the limits and the one deadline.

The environment is a venv without site-packages whose site-packages links the installed distributions those six
packages require, found through their metadata; XLA's CPU backend compiles at optimisation level 0 (the numbers are
not the point, only that every line is printed).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch")


def _image_venv(dst: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dst)], check=True)
    site = next(dst.glob("lib/python*/site-packages"))
    seen, todo = set(), list(IMAGE)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        todo += [re.split(r"[ ;<>=!~\[(]", r)[0] for r in dist.requires or [] if "extra ==" not in r]
        for f in dist.files or []:
            top = f.parts[0]
            src = pathlib.Path(dist.locate_file(top))
            if top != ".." and not top.endswith(".pth") and src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    return dst / "bin" / "python"


SCRIPTS = [("gpu_matmul.py", "--tiny"), ("gpu_dit.py", "--tiny"), ("gpu_train.py", "--tiny"),
           ("gpu_sample.py", "--tiny"), ("gpu_vae.py", "--tiny")]
# One process runs every script, as __main__, from outside the repository: between scripts the repository root
# leaves sys.path and our modules leave sys.modules, so each script must find the repository itself.
RUNNER = """
import runpy, sys
root = sys.argv[1]
for script, *args in %r:
    sys.path[:] = [p for p in sys.path if p != root]
    for m in [m for m in sys.modules if m.partition(".")[0] in ("bench", "pickstyle_jax")]:
        del sys.modules[m]
    print("=== " + script, flush=True)
    sys.argv = [root + "/bench/" + script, *args]
    runpy.run_path(sys.argv[0], run_name="__main__")
print("=== all done", flush=True)
"""


def test_every_gpu_benchmark_runs_on_the_image_without_the_repo(tmp_path):
    py = _image_venv(tmp_path / "image")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('grain', 'ml_collections', "
                            "'imageio', 'sentencepiece', 'pickstyle_jax', 'jax', 'flax', 'optax') if u.find_spec(m)])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "['jax', 'flax', 'optax']", probe.stdout

    t0 = time.time()
    r = subprocess.run([str(py), "-c", RUNNER % (SCRIPTS,), str(ROOT)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    out = r.stdout + r.stderr
    print(out[-6000:], f"\nthe five scripts took {time.time() - t0:.0f} s")
    assert r.returncode == 0 and "=== all done" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    failed = [ln for ln in out.splitlines() if "FAILED" in ln and "attention=cudnn" not in ln]  # no cuDNN on CPU
    assert not failed, failed
    for pattern in (r"matmul 256\^3 bf16: .* TFLOP/s +MFU .* of 989 / .* of 790 TFLOP/s",
                    r"numerics \(.*\): bf16 vs fp32 rel L2",
                    r"attention=auto->chunked: compile", r"attention=auto->chunked: first run",
                    r"RESULT forward attention=auto->chunked S=8: .* ms/forward .* MFU",
                    r"remat=full: compile", r"remat=full: first step",
                    r"RESULT train step remat=full S=8: .* s \(median of 2\) .* MFU .* loss \d",
                    r"  compile .* s\n  first run \(warm-up\) .* s/video",
                    r"RESULT sampler S=8: median of 1: .* s/video .* MFU",
                    r"cpu: encode float32 .* compile .* finite True", r"cpu: decode float32 .* compile .* finite True"):
        assert re.search(pattern, out), f"no line matches {pattern!r}:\n{out[-3000:]}"


STUB = """#!/bin/sh
echo "PY $*"
case "$1" in bench/*) sleep "$STUB_SLEEP";; esac
"""


def test_gpu_sh_runs_each_script_within_one_deadline(tmp_path):
    """bench/gpu.sh with a stand-in interpreter: every script is started with the given flags and its own limit, the
    limits shrink to what is left of the total, a stage that overruns is killed and the rest are skipped, and the
    default total (kill grace included) stays under 9 minutes."""
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def gpu_sh(total, sleep):
        r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={**env, "PY": str(stub), "STUB_SLEEP": str(sleep),
                                                        "GPU_BENCH_TOTAL_S": str(total)})
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    out = gpu_sh(530, 0)
    for script, budget in (("gpu_matmul", 40), ("gpu_dit", 120), ("gpu_train", 150), ("gpu_sample", 120),
                           ("gpu_vae", 200)):
        assert re.search(rf"=== bench/{script}.py \(limit {budget} s", out), out
    assert "PY bench/gpu_dit.py --impls auto,chunked --tiny" in out and "PY bench/gpu_train.py --tiny" in out
    assert "PY bench/gpu_vae.py --dtypes bfloat16 --tiny" in out and "exited" not in out

    t0 = time.time()
    out = gpu_sh(16, 60)  # the matmul stage gets 16 - 5 = 11 s and overruns: killed; nothing else has time left
    assert time.time() - t0 < 16, out
    assert re.search(r"=== bench/gpu_matmul.py \(limit 11 s", out) and "gpu_matmul.py exited with status 124" in out
    assert all(f"=== bench/{s}.py skipped" in out for s in ("gpu_dit", "gpu_train", "gpu_sample", "gpu_vae")), out

    total = int(re.search(r"TOTAL_S=\$\{GPU_BENCH_TOTAL_S:-(\d+)\}", (ROOT / "bench" / "gpu.sh").read_text())[1])
    assert total == 530 and total + 5 < 9 * 60
