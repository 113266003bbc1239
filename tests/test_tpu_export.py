"""TPU lowering without a TPU: `jax.export` for platform "tpu" on 8 simulated host devices (data 2 x fsdp 4).

Exporting lowers every Pallas kernel through Mosaic to a `tpu_custom_call` and records the mesh shardings; it
needs no TPU (compilation, which would, happens only when a TPU loads the artifact). This is our proof that the
splash path lowers for TPU, sharded. XLA_FLAGS must be set before JAX starts, so each case runs in its own
Python process.
"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pickstyle_jax import sharding
    from pickstyle_jax.models import layers, splash
    assert jax.device_count() == 8, jax.devices()
    seed = int(sys.argv[1])
    # tensor 1: the default rules name it ("heads", "mlp"), and the models' NNX sharding metadata wants every
    # rule's mesh axis to exist
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    RULES = {**sharding.DEFAULT_RULES, "layers": None}
    QKV_SPLIT = '[{"data", "fsdp"}, {}, {"tensor"}, {}]'  # [B, S, N, K] blocks entering the kernel's shard_map
    BATCH = ("data", "fsdp")

    def export_tpu(fn, *args):
        exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
        text = exported.mlir_module()
        assert exported.platforms == ("tpu",) and exported.nr_devices == 8, (exported.platforms,
                                                                              exported.nr_devices)
        calls = text.count("@tpu_custom_call")
        print("tpu_custom_call count:", calls)
        assert calls >= 1 and "sdy.manual_computation" in text
        # the StableHLO bytecode a TPU host would load (`serialize()` wraps it, but needs flatbuffers)
        assert b"tpu_custom_call" in exported.mlir_module_serialized
        return exported, text
""")

_KERNEL = _PRELUDE + textwrap.dedent("""
    from flax import linen as nn
    b, s, n, kd = 8, 200, 2, 128
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, n, kd)), jnp.float32) for _ in range(3))
    lens = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    sh = NamedSharding(mesh, P(BATCH))

    # numbers first: the kernel sharded over an explicit mesh (interpret mode, one example per device)
    sharded = lambda q, k, v, lens: splash.attention(q, k, v, kv_lens=lens, block_q=128, block_kv=128, mesh=mesh,
                                                     batch_axes=BATCH)
    got = jax.jit(sharded)(*jax.device_put((q, k, v, lens), sh))
    want = layers.attention(q, k, v, implementation="xla", kv_lens=lens)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    print("sharded splash vs xla, relative L2:", err)
    assert err <= 1e-5, err

    # and through an ambient mesh of explicit-sharding axes (jax.make_mesh's default), without a "tensor" axis
    explicit = jax.make_mesh((2, 4), BATCH, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(explicit), nn.logical_axis_rules(tuple(RULES.items())):
        got = jax.jit(lambda q, lens: splash.attention(q, q, q, kv_lens=lens, block_q=128, block_kv=128))(
            jax.device_put(q, NamedSharding(explicit, P(BATCH))), lens)
    want = layers.attention(q, q, q, implementation="xla", kv_lens=lens)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    print("splash on an explicit-axes mesh vs xla, relative L2:", err)
    assert err <= 1e-5 and got.sharding.spec[0] == BATCH, (err, got.sharding)

    # then the Mosaic lowering of forward + gradient in bf16, as the models call it: no mesh argument, the
    # ambient mesh and Flax logical-axis rules decide the shard_map
    def loss_and_grads(q, k, v, lens):
        loss = lambda q, k, v: jnp.sum(splash.attention(q, k, v, kv_lens=lens).astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    abstract = [jax.ShapeDtypeStruct(q.shape, jnp.bfloat16, sharding=sh)] * 3
    abstract.append(jax.ShapeDtypeStruct(lens.shape, jnp.int32, sharding=sh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(RULES.items())):
        exported, text = export_tpu(loss_and_grads, *abstract)
    assert text.count("@tpu_custom_call") >= 3  # forward, dq and dkv kernels
    assert QKV_SPLIT in text, "q/k/v not split batch over data x fsdp, heads over tensor"

    # why the shard_map matters: without a mesh in sight the kernel meets sharded operands, which Mosaic refuses
    try:
        jax.export.export(jax.jit(lambda q: splash.attention(q, q, q)), platforms=("tpu",))(abstract[0])
        raise AssertionError("an unsharded Mosaic call on sharded operands exported")
    except NotImplementedError as e:
        assert "cannot be automatically partitioned" in str(e), e
""")


_MODEL = _PRELUDE + textwrap.dedent("""
    from flax import linen as nn
    from pickstyle_jax import lora
    from pickstyle_jax.models import wan

    # head dim 128 as in Wan; bf16 compute as on TPU; every block scanned and fully rematerialised
    small = dict(dim=256, num_heads=2, ffn_dim=256)
    cfg = wan.WanConfig.named("tiny", **small)
    opts = wan.Options(attention="splash", scan_layers=True, dtype="bfloat16", remat_policy="full")
    shapes = wan.param_shapes(cfg, stacked=opts.scan_layers)
    shardings = sharding.tree_shardings(wan.param_axes(cfg, stacked=opts.scan_layers), mesh, RULES, shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    assert any(sh.spec != P() for sh in jax.tree.leaves(shardings)), "nothing sharded: the test would prove little"
    lcfg = lora.LoraConfig(rank=4, alpha=4, targets=r"(blocks|vace_blocks)\\.\\d+\\.(self_attn|cross_attn)\\.(q|k|v|o)")
    flat = wan.WanConfig.named("tiny", **small)
    adapters = jax.eval_shape(lambda: lora.init(lcfg, wan.init(flat, jax.random.key(0)), jax.random.key(1)))
    adapters = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())),
                            adapters)
    b, f, h, w = 8, 2, 6, 10  # 30 video tokens: padded to the 128 block inside the kernel wrapper
    def batch(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), RULES))
    inputs = (batch((b, f, h, w, 16)), batch((b,)), batch((b, 20, cfg.text_dim)), batch((b, f, h, w, 96)),
              batch((b,), jnp.int32))

    def loss_and_lora_grad(adapters, params, x, t, text, context, text_lens):
        def loss(a):
            v = wan.forward(cfg, params, x, t, text, context, lora=a, text_lens=text_lens, options=opts)
            return jnp.mean(v ** 2)
        return jax.value_and_grad(loss)(adapters)

    # sharding.flax_rules drops the rules' mesh axes this mesh lacks ("context" in "embed")
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_rules(RULES, mesh)):
        exported, text = export_tpu(loss_and_lora_grad, adapters, params, *inputs)
    # main and VACE self-attention, each: forward, forward again in the rematerialised backward, dq, dkv
    assert text.count("@tpu_custom_call") >= 8, text.count("@tpu_custom_call")
    assert "stablehlo.while" in text, "no scan over the layers"
    assert QKV_SPLIT in text, "q/k/v not split batch over data x fsdp, heads over tensor"
    grads = exported.out_avals[1:]
    assert len(grads) == len(jax.tree.leaves(adapters)), (len(grads), len(jax.tree.leaves(adapters)))
""")

_CONTEXT = _PRELUDE + textwrap.dedent("""
    from flax import linen as nn
    from pickstyle_jax import lora
    from pickstyle_jax.models import wan

    # the video tokens split over a context axis of 4: Ulysses all-to-alls around the splash kernel, which runs
    # inside the model's own shard_map (per device: one of the 4 heads, every token); 30 tokens, padded to 32
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "context": 4})
    cfg = wan.WanConfig.named("tiny", dim=512, num_heads=4, ffn_dim=256, num_layers=2, vace_layers=(0,))
    opts = wan.Options(attention="splash", scan_layers=True, dtype="bfloat16", remat_policy="full",
                       context_parallel="ulysses")
    shapes = wan.param_shapes(cfg, stacked=True)
    shardings = sharding.tree_shardings(wan.param_axes(cfg, stacked=True), mesh, RULES, shapes)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    assert any("context" in str(sh.spec) for sh in jax.tree.leaves(shardings)), "weights not split over context"
    lcfg = lora.LoraConfig(rank=4, alpha=4)  # PickStyle's targets: the VACE blocks' self-attention q, k, v
    adapters = jax.eval_shape(lambda: lora.init(lcfg, wan.init(cfg, jax.random.key(0)), jax.random.key(1)))
    adapters = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())),
                            adapters)
    b, f, h, w = 2, 2, 6, 10
    def batch(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), RULES))
    inputs = (batch((b, f, h, w, 16)), batch((b,)), batch((b, 20, cfg.text_dim)), batch((b, f, h, w, 96)))

    def loss_and_lora_grad(adapters, params, x, t, text, context):
        loss = lambda a: jnp.mean(wan.forward(cfg, params, x, t, text, context, lora=a, options=opts) ** 2)
        return jax.value_and_grad(loss)(adapters)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_rules(RULES, mesh)):
        exported, text = export_tpu(loss_and_lora_grad, adapters, params, *inputs)
    calls, a2a = text.count("@tpu_custom_call"), text.count("stablehlo.all_to_all")
    print("tpu_custom_call", calls, "all_to_all", a2a)
    assert calls >= 8 and a2a >= 8, (calls, a2a)  # main and VACE: forward, remat forward, dq, dkv; q/k/v/out a2a
    assert '[{"data", "fsdp"}, {"context"}, {"tensor"}, {}]' in text, "q/k/v not split: batch, tokens over context"
""")


def _run(script, seed):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script, str(seed)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, f"seed {seed}\n{r.stdout}\n{r.stderr[-4000:]}"


def test_splash_kernel_exports_for_tpu_sharded(seed):
    _run(_KERNEL, seed)


def test_wan_forward_and_lora_grad_export_for_tpu():
    """wan.forward + the LoRA gradient, attention="splash", scan_layers=True, params FSDP-sharded over 8 devices."""
    _run(_MODEL, 0)


def test_context_parallel_forward_and_lora_grad_export_for_tpu():
    """The same with a context axis (data 2 x context 4): Ulysses around the splash kernel, padded tokens masked."""
    _run(_CONTEXT, 0)
