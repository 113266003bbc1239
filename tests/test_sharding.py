"""Multi-device: the DiT sharded FSDP x tensor x data over 8 host devices equals the single-device forward.

XLA_FLAGS must be set before JAX starts, so the sharded part runs in its own Python process.
"""
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from pickstyle_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from pickstyle_jax import lora, sharding
    from pickstyle_jax.models import wan
    assert jax.device_count() == 8, jax.devices()
    seed = int(sys.argv[1])
    cfg = wan.WanConfig.named("tiny").replace(dim=64, num_heads=2, ffn_dim=128)
    params = wan.init(cfg, jax.random.key(seed))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), params)
    adapters = lora.init(lora.LoraConfig(rank=4, alpha=4), params, jax.random.key(seed + 2))
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    rng = np.random.default_rng(seed)
    b, f, h, w = 4, 2, 4, 6
    x = rng.standard_normal((b, f, h, w, 16), dtype=np.float32)
    ctx = rng.standard_normal((b, f, h, w, 96), dtype=np.float32)
    text = rng.standard_normal((b, 11, cfg.text_dim), dtype=np.float32)
    t = rng.uniform(0, 1000, b).astype(np.float32)
    fwd = lambda p, a, *args: wan.forward(cfg, p, *args, lora=a)
    want = np.asarray(jax.jit(fwd)(params, adapters, x, t, text, ctx))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    p_sh = sharding.shard(params, wan.param_axes(cfg), mesh)
    q = p_sh["blocks"]["0"]["self_attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 32)
    inputs = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, t, text, ctx)]
    got = jax.jit(fwd)(p_sh, adapters, *inputs)
    err = float(np.abs(np.asarray(got) - want).max())
    print("max abs error sharded vs single device:", err)
    assert err <= 1e-5, err
""")


def test_sharded_forward_matches_single_device():
    seed = int.from_bytes(os.urandom(2), "little")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(seed)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr[-4000:]}"


def test_rules_and_mesh_errors():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1}
    assert sharding.logical_to_spec(("embed", "heads"), sharding.DEFAULT_RULES) == P("fsdp", "tensor")
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'nope'"):
        sharding.logical_to_spec(("nope",), sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh({"data": jax.device_count() + 1})
