"""Stylising on 8 simulated CPU devices, in one subprocess (XLA_FLAGS must be set before JAX starts), fp32, tiny
models, in the layout accelerators run the released variants in (`wan.Options(scan_layers=True)`: the weights are
read flat and stacked on load), with a LoRA:

- `Stylizer.load(mesh=devices.make("data=2,fsdp=4"))` places the weights stacked and fsdp-sharded and gives the
  one-device frames within 1 grey level on average, and so does data=2,context=4 (the tokens split inside
  attention);
- its VAE splits every frame over the devices (latents come back split along width/height) and its encoder
  equals the one-device one (the decoder is checked through the frames);
- `cli.stylize` on process 1 of 2 writes nothing (the CLI's multi-host flags are tests/test_stylize.py's).

(This replaces the 4-device tests/test_stylizer_mesh.py, which checked the same on data=2 x fsdp=2.)
"""
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import os, sys, pathlib, time
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from pickstyle_jax import conditioning, sample, stylize, video
    from pickstyle_jax.models import wan
    from pickstyle_jax.sample import devices
    from tests import tiny_models
    assert jax.device_count() == 8, jax.devices()

    seed, root = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,), text_dim=64)  # umT5 tiny: 64 wide
    saved = {**tiny_models.save_models(root, root / "lora", cfg, seed), "tokenizer": "bytes"}
    y, x = np.mgrid[0:32, 0:64]
    clip = np.asarray([np.stack([(40 * c + 4 * x + 3 * y + 9 * t) % 256 for c in range(3)], -1)
                       for t in range(5)]).astype(np.uint8)
    kw = dict(steps=3, skip=1, max_frames=5, seed=7)
    prompt = "Anime style. A cat."

    t0 = time.perf_counter()
    scanned = wan.Options.default(scan_layers=True)
    one = sample.Stylizer.load(**saved)
    want = one(clip, prompt, **kw)
    mesh = devices.make("data=2,fsdp=4")
    many = sample.Stylizer.load(**saved, mesh=mesh, options=scanned)
    assert wan.is_stacked(many.cfg, many.params) and many.adapters is not None
    for tree in ("blocks", "vace_blocks"):
        q = many.params[tree]["self_attn"]["q"]["kernel"]
        assert q.sharding.spec == P(None, "fsdp", None), (tree, q.sharding.spec)
    got = many(clip, prompt, **kw)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    print(f"data=2,fsdp=4 vs one device: mean {diff.mean():.4f}, max {diff.max()} grey levels "
          f"(frames std {want.std():.1f}; {time.perf_counter() - t0:.1f} s)")
    assert got.shape == want.shape == (5, 32, 64, 3)
    assert diff.mean() <= 1.0 and diff.max() <= 2, (diff.mean(), diff.max())

    # context parallelism: the video tokens split 4 ways inside self-attention, the weights over (fsdp, context)
    ctx = sample.Stylizer.load(**saved, mesh=devices.make("data=2,context=4"), options=scanned)
    got_c = ctx(clip, prompt, **kw)
    diff_c = np.abs(got_c.astype(np.int16) - want.astype(np.int16))
    print(f"data=2,context=4 vs one device: mean {diff_c.mean():.4f}, max {diff_c.max()} grey levels")
    assert diff_c.mean() <= 1.0 and diff_c.max() <= 2, (diff_c.mean(), diff_c.max())

    # the VAE ran split: the source's latents [1, 2, 4, 8, 16] (the stylizers' own compiled encoders, cached) come
    # back split over all 8 devices along width (and height), and equal one device's
    pixels = conditioning.pixels(clip)[None]
    z1, z8 = one._encode(one.vae_params, pixels), many._encode(many.vae_params, pixels)
    spec = z8.sharding.spec
    assert {a for d in spec[2:4] if d for a in ((d,) if isinstance(d, str) else d)} == {"data", "fsdp"}, spec
    zd = float(np.max(np.abs(np.asarray(z8) - np.asarray(z1))))
    print(f"VAE split {spec}: encode max diff {zd:.2e} (latents std {float(np.std(np.asarray(z1))):.2f})")
    assert zd < 1e-4, zd

    # process 1 of 2 (jax.process_index mocked) writes nothing; the same compiled stylizer
    jax.process_index = lambda *a: 1
    out = root / "res" / "out.mp4"
    record = stylize.stylize(video.write(root / "in.mp4", clip, fps=16), prompt, dit=saved["dit"], vae="", umt5="",
                             tokenizer="bytes", out=out, stylizer=many, progress=False, **kw)
    assert record["mesh"] == {"data": 2, "fsdp": 4} and record["frames_out"] == 5, record
    assert not out.parent.exists(), list(out.parent.iterdir())
    print("process 1 of 2 wrote nothing")
""")


def test_stylize_on_8_devices_equals_one(tmp_path, seed):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed % 10000), str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr[-4000:]}"
