"""`Stylizer.load(..., mesh=..., options=wan.Options(scan_layers=True))`, the layout accelerators run the released
variants in (the weights are read flat and stacked on load), with a LoRA, on 4 simulated CPU devices (data 2 x
fsdp 2): the weights land stacked and sharded, and the stylised frames equal the single-device Stylizer's.

XLA_FLAGS must be set before JAX starts, so the check runs in its own Python process.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import os, sys, pathlib
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import PartitionSpec as P
    from pickstyle_jax import sample, sharding
    from pickstyle_jax.models import wan
    from tests import tiny_models
    assert jax.device_count() == 4, jax.devices()

    seed, root = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    cfg = wan.WanConfig.named("tiny").replace(num_layers=4, vace_layers=(0, 2), text_dim=64)  # umT5 tiny: 64 wide
    saved = {**tiny_models.save_models(root, root / "lora", cfg, seed), "tokenizer": "bytes"}
    scanned = wan.Options.default(scan_layers=True)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2})

    # without a LoRA: the shardings follow the stacked tree that is loaded
    st = sample.Stylizer.load(**{k: v for k, v in saved.items() if k != "lora"}, mesh=mesh, options=scanned)
    q = st.params["blocks"]["self_attn"]["q"]["kernel"]
    assert st.options.scan_layers and q.shape == (4, 48, 48), q.shape
    assert q.sharding.spec == P(None, "fsdp", None), q.sharding.spec

    y, x = np.mgrid[0:32, 0:48]
    clip = np.asarray([np.stack([(40 * c + 4 * x + 3 * y + 9 * t) % 256 for c in range(3)], -1)
                       for t in range(5)]).astype(np.uint8)
    kw = dict(steps=3, skip=1, max_frames=5, seed=7)
    prompt = "Anime style. A cat."
    on_mesh = sample.Stylizer.load(**saved, mesh=mesh, options=scanned)
    assert wan.is_stacked(on_mesh.cfg, on_mesh.params) and on_mesh.adapters is not None
    assert on_mesh.params["vace_blocks"]["self_attn"]["k"]["kernel"].sharding.spec == P(None, "fsdp", None)
    got = on_mesh(clip, prompt, **kw)
    want = sample.Stylizer.load(**saved)(clip, prompt, **kw)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    print(f"mesh vs one device: max {diff.max()}, mean {diff.mean():.4f} grey levels (frames std {want.std():.1f})")
    assert got.shape == want.shape == (5, 32, 48, 3)
    assert diff.max() <= 1 and diff.mean() <= 0.05, (diff.max(), diff.mean())
""")


def test_stylizer_on_a_mesh_loads_the_released_layout(tmp_path, seed):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 10000), str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr[-4000:]}"
