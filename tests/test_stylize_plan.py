"""`python -m pickstyle_jax.plan --job=stylize` on configs/pickstyle.py:tiny and 4 simulated devices (the entry point
sets XLA_FLAGS, so it runs as its own process): the last line is the JSON plan; --mesh auto puts the 4 devices on
the context axis, and with the tokens split inside attention and the VAE split over the frames, the DiT step's and
the decode's FLOPs per device are a quarter of one device's (no compute repeated)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_stylize_plan_json_and_flops_split(seed):
    del seed  # abstract shapes only: nothing random
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "pickstyle_jax.plan", "--job=stylize",
                        "--config=configs/pickstyle.py:tiny", "--devices=4", "--mesh=auto", "--size=128x128",
                        "--frames=1", "--text_len=16", "--stages=vae_decode", "--baseline"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["job"] == "stylize" and out["devices"] == 4 and out["mesh"] == {"data": 1, "context": 4}
    assert out["size"] == [1, 128, 128] and out["tokens"] == 1 * 8 * 8
    assert set(out["stages"]) == {"dit_step", "vae_decode"}
    for st in out["stages"].values():
        assert 0 < st["peak_bytes"] <= out["peak_bytes_per_device"] and st["flops"] > 0
    assert out["flops_per_device"] == out["stages"]["dit_step"]["flops"]
    assert out["weight_bytes_per_device"]["dit"] > 0
    for stage, ratio in out["flops_ratio"].items():  # per-device FLOPs / (one device's / 4)
        assert 0.8 <= ratio <= 1.25, (stage, ratio, out["baseline_flops"])
