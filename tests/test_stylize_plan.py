"""`python -m pickstyle_jax.plan --job=stylize` on configs/pickstyle.py:tiny and 4 simulated devices (the entry point
sets XLA_FLAGS, so it runs as its own process): the last line is the JSON plan; --mesh auto puts the 4 devices on
the context axis, and with the tokens split inside attention and the VAE split over the frames, the DiT step's and
the decode's FLOPs per device are a quarter of one device's (no compute repeated)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

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


_SPLIT = textwrap.dedent("""
    import os, re, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp
    from pickstyle_jax import lora, sharding
    from pickstyle_jax.models import wan
    from pickstyle_jax.sample import devices
    from pickstyle_jax.sample.sampler import make_sampler

    cfg = wan.WanConfig.named("tiny").replace(ffn_dim=80)  # 2 heads over context 4: the ring; 80: not the head's 64
    opts = wan.Options(attention="chunked", attention_chunk=8, attention_kv_chunk=8, ffn_chunk=10, scan_layers=True)
    mesh = devices.make("context=4", n_branches=3, devices=jax.devices()[:4])
    rules = sharding.DEFAULT_RULES
    shapes = wan.param_shapes(cfg, stacked=True)
    shard = sharding.tree_shardings(wan.param_axes(cfg, stacked=True), mesh, rules, shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)
    rep = sharding.replicated(mesh)
    adapters = jax.eval_shape(lambda: lora.init(lora.LoraConfig(rank=4, alpha=4.0), wan.param_shapes(cfg),
                                                jax.random.key(0)))
    adapters = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), adapters)
    arg = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    sampler = make_sampler(cfg, steps=2, skip=1, mesh=mesh, options=opts)  # one executed CS-CFG step
    hlo = sampler.lower(params, adapters, arg(1, 3, 20, 28, 16), arg(1, 3, 20, 28, cfg.vace_in_dim),
                        arg(1, 16, cfg.text_dim), arg(1, 16, cfg.text_dim), arg(2, dtype=jnp.uint32),
                        text_lens=arg(1, dtype=jnp.int32), null_text_lens=arg(1, dtype=jnp.int32)).compile().as_text()
    # 3 x 10 x 14 = 420 tokens, 105 per device: a [branches, tokens, D or ffn_dim] activation gathered over more of
    # them (the head's [branches, tokens, 4 x 16] velocities are gathered: the latents are whole on every device)
    gathered = [m for m in re.findall(r"= f32\\[(\\d+),(\\d+),(\\d+)\\][^ ]* all-gather", hlo)
                if int(m[1]) > 105 and int(m[2]) in (cfg.dim, cfg.ffn_dim)]
    # the ring's logits per step: [B, N, 8 queries, 8 keys], never a device's 105 queries at once
    whole_block = re.findall(r"f32\\[[\\d,]*\\b105,8\\]", hlo)
    print(f"{len(gathered)} token gathers, {len(whole_block)} arrays of 105 x 8 logits")
    assert not gathered and not whole_block, (gathered, whole_block)
""")


def test_stylize_step_keeps_tokens_split_over_context():
    """The CS-CFG step on a context axis holds no whole-sequence activation: the VACE context's embedding stays
    split (sampler), the FFN groups tokens within each device's block (ffn_chunk), and the ring attends in query
    blocks. Compiles a tiny scanned sampler on 4 simulated devices and reads the compiled program."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _SPLIT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
