"""The GPU check cannot rot: `bash bench/gpu.sh --tiny` runs every bench/gpu_*.py script at tiny sizes on the CPU,
in a Python environment shaped like the GPU image (jax, flax, optax, orbax-checkpoint, numpy, torch and their
dependencies only: no grain, ml_collections, imageio, sentencepiece, no install of this repository) and with no
PYTHONPATH, and each script prints its result lines.

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


def test_gpu_sh_runs_every_benchmark_on_the_image_without_the_repo(tmp_path):
    py = _image_venv(tmp_path / "image")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PY=str(py), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('grain', 'ml_collections', "
                            "'imageio', 'sentencepiece', 'pickstyle_jax', 'jax', 'flax', 'optax') if u.find_spec(m)])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "['jax', 'flax', 'optax']", probe.stdout

    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    print(out[-6000:], f"\ngpu.sh --tiny took {time.time() - t0:.0f} s")
    assert r.returncode == 0, out[-3000:]
    assert "exited with status" not in out and "skipped" not in out and "Traceback" not in out, out[-3000:]
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
                    r"cpu: encode float32 .* compile .* finite True", r"cpu: decode float32 .* compile .* finite True",
                    r"=== done in \d+ s"):
        assert re.search(pattern, out), f"no line matches {pattern!r}:\n{out[-3000:]}"
    total = int(re.search(r"TOTAL_S=\$\{GPU_BENCH_TOTAL_S:-(\d+)\}", (ROOT / "bench" / "gpu.sh").read_text())[1])
    assert total + 5 < 9 * 60  # the whole script, kill grace included, within 9 minutes
