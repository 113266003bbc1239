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
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from pickstyle_jax import lora, sharding
    from jax.sharding import PartitionSpec as P
    from pickstyle_jax.models import layers, wan
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
    # every leaf's spec, against the rules spelled out by hand (embed -> fsdp, heads/mlp -> tensor, an axis the
    # mesh does not divide (or a mesh axis already used) stays replicated)
    by_hand = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "mod": None, None: None, "layers": None}

    def expected(axes, shape):
        used, out = set(), []
        for name, n in zip(axes, shape):
            m = by_hand[name]
            m = None if m is None or m in used or n % mesh.shape[m] else m
            used.add(m)
            out.append(m)
        return P(*out)

    def check_every_leaf(tree, axes_tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        axes_leaves = jax.tree.leaves(axes_tree, is_leaf=lambda a: isinstance(a, tuple))
        assert len(leaves) == len(axes_leaves) > 0
        for (path, leaf), axes in zip(leaves, axes_leaves):
            assert leaf.sharding.spec == expected(axes, leaf.shape), (jax.tree_util.keystr(path), leaf.sharding.spec)
        return len(leaves)

    n_checked = check_every_leaf(p_sh, wan.param_axes(cfg))
    inputs = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, t, text, ctx)]
    got = jax.jit(fwd)(p_sh, adapters, *inputs)
    err = float(np.abs(np.asarray(got) - want).max())
    print("max abs error sharded vs single device:", err, "leaves checked:", n_checked)
    assert err <= 1e-5, err

    # scanned layers: the stacked tree (leading "layers" axis, replicated) sharded by the same rules
    rules = {**sharding.DEFAULT_RULES, "layers": None}
    s_axes = wan.param_axes(cfg, stacked=True)
    s_sh = jax.device_put(wan.stack_layers(cfg, params),
                          sharding.tree_shardings(s_axes, mesh, rules, wan.param_shapes(cfg, stacked=True)))
    check_every_leaf(s_sh, s_axes)
    sfwd = lambda p, a, *args: wan.forward(cfg, p, *args, lora=a)  # the stacked tree runs scanned
    plain = jax.jit(sfwd).lower(s_sh, adapters, *inputs).as_text()
    got = jax.jit(sfwd)(s_sh, adapters, *inputs)  # FSDP x tensor sharded stacked weights, a plain jit
    err = float(np.abs(np.asarray(got) - want).max())
    print("max abs error scanned, sharded weights vs single device:", err)
    assert err <= 1e-5, err
    sfwd = jax.jit(sfwd)  # a fresh jit: traces are cached without regard to the rules context
    # under the rules hint (what training and sampling enter): the same pins, now from the caller's rules
    with sharding.rules_context(mesh, rules):
        lowered = sfwd.lower(s_sh, adapters, *inputs)
        got = sfwd(s_sh, adapters, *inputs)
    text_hlo = lowered.as_text()
    count = lambda hlo: hlo.count("sharding_constraint") + hlo.count("@Sharding")  # Shardy or GSPMD lowering
    n_plain, n_rules = count(plain), count(text_hlo)
    print("sharding constraints without / with the rules hint:", n_plain, n_rules)
    assert n_plain > 0 and n_rules > 0, (n_plain, n_rules)  # the model pins its own layout either way
    batch_spec = [line for line in text_hlo.splitlines() if "sharding_constraint" in line or "@Sharding" in line]
    assert any('"data", "fsdp"' in line or "[4,1,1,2]" in line for line in batch_spec), batch_spec[:3]
    err = float(np.abs(np.asarray(got) - want).max())
    print("max abs error scanned sharded vs single device:", err)
    assert err <= 1e-5, err

    # a tensor axis that does not divide the heads: refused by strict rules (naming num_heads), whole-head
    # (replicated) under allow_replicate, for the DiT and umT5 alike, and refused by a strict forward too
    from pickstyle_jax.models import umt5
    strict = {**sharding.DEFAULT_RULES, "allow_replicate": False}
    cfg3 = cfg.replace(dim=48, num_heads=3, ffn_dim=64)
    for axes, shapes in ((wan.param_axes(cfg3), wan.param_shapes(cfg3)),
                         (umt5.param_axes(umt5.Umt5Config.named("tiny").replace(num_heads=3, d_kv=16, d_model=48)),
                          umt5.param_shapes(umt5.Umt5Config.named("tiny").replace(num_heads=3, d_kv=16, d_model=48)))):
        try:
            sharding.tree_shardings(axes, mesh, strict, shapes)
            raise AssertionError("3 heads over tensor 2 were not refused")
        except sharding.ShardingError as e:
            assert "num_heads=3" in str(e), e
    loose = sharding.tree_shardings(wan.param_axes(cfg3), mesh, sharding.DEFAULT_RULES, wan.param_shapes(cfg3))
    assert loose["blocks"]["0"]["self_attn"]["q"]["kernel"].spec == P("fsdp", None)
    assert loose["blocks"]["0"]["ffn"]["0"]["kernel"].spec == P("fsdp", "tensor")
    p3 = jax.device_put(wan.init(cfg3, jax.random.key(seed)), loose)
    x3 = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (x, t, text[..., :cfg3.text_dim], ctx)]
    with sharding.rules_context(mesh, strict):
        try:
            jax.jit(lambda p, *a: wan.forward(cfg3, p, *a))(p3, *x3)
            raise AssertionError("a strict forward split 3 heads over tensor 2")
        except sharding.ShardingError as e:
            assert "num_heads=3" in str(e), e
    # explicit mesh axes (jax.make_mesh's default) are refused up front, naming them
    explicit = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    p_ex = jax.device_put(params, sharding.tree_shardings(wan.param_axes(cfg), explicit, rules, wan.param_shapes(cfg)))
    try:
        jax.jit(lambda p, *a: wan.forward(cfg, p, *a))(p_ex, x, t, text, ctx)
        raise AssertionError("a forward on explicit mesh axes was not refused")
    except sharding.ShardingError as e:
        assert "Explicit" in str(e) and "'data'" in str(e), e
""")


def test_sharded_forward_matches_single_device(seed):
    seed = seed % 65536
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(seed)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr[-4000:]}"


def test_rules_and_mesh_errors():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1}
    # weights over fsdp and the devices that split the tokens; a mesh without a context axis drops it
    assert sharding.logical_to_spec(("embed", "heads"), sharding.DEFAULT_RULES) == P(("fsdp", "context"), "tensor")
    assert sharding.logical_to_spec(("embed", "length"), sharding.DEFAULT_RULES, mesh) == P("fsdp", None)
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'nope'"):
        sharding.logical_to_spec(("nope",), sharding.DEFAULT_RULES)
    with pytest.raises(ValueError, match="does not fit 1 devices"):
        sharding.make_mesh({"data": jax.device_count() + 1})
