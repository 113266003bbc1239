"""Context parallelism (a "context" mesh axis splitting the video tokens) equals one device: the DiT forward and the
gradient of a LoRA on the VACE blocks' self-attention q/k/v (and cross-attention k/v: the text keys every device
holds whole), and the training step (loss, gradient norm, new LoRA).

8 simulated CPU devices, fp32, a tiny DiT (one main and one VACE block) with 8 heads (so context 2, 4 and 8
divide them, alone and after a tensor split of 2), 3 x 10 x 14 = 420 video tokens (x [B, 3, 20, 28, 16], patch
1 x 2 x 2), which context 8 does not divide: it pads to a multiple of its context size and masks the padding, so
the padding is checked too.
Cases: context 2, 4, 8 alone, data 2 x context 4, fsdp 2 x context 4, tensor 2 x context 4; Ulysses and ring (the
ring also in query and key blocks, with the FFN in token groups: `Options.ffn_chunk`); flat and scanned layouts;
all under a plain jax.jit with no rules_context. The train step runs the tiny training config (2 heads: "auto"
takes the ring) on context 8 and on fsdp 2 x context 4 through the trainer's compiled step, and, in the same
process against the same one-device step, scanned on data 2 x fsdp 2 x tensor 2 under a plain jit.

XLA_FLAGS must be set before JAX starts, so each group runs in its own Python process; each case compiles once.
"""
import json
import math
import textwrap

from tests import multidevice

_PRELUDE = textwrap.dedent("""
    import os, sys, json, functools
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from absl import flags; flags.FLAGS.mark_as_parsed()
    from pickstyle_jax import lora, sharding
    from pickstyle_jax.models import wan
    from pickstyle_jax.train import setup, step as step_lib
    seed = int(sys.argv[1])
    print("seed", seed, flush=True)
""") + multidevice.CHECKS

_MODEL = _PRELUDE + textwrap.dedent("""
    cases = json.loads(sys.argv[2])
    cfg = wan.WanConfig.named("tiny").replace(dim=64, ffn_dim=64, num_heads=8, num_layers=1, vace_layers=(0,))
    params = wan.init(cfg, jax.random.key(seed))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), params)
    lcfg = lora.LoraConfig(rank=4, alpha=4.0, targets=r"vace_blocks\\.\\d+\\.(self_attn\\.(q|k|v)|cross_attn\\.(k|v))")
    adapters = random_b(lora.init(lcfg, params, jax.random.key(seed + 2)), jax.random.key(seed + 3))
    rng = np.random.default_rng(seed)
    b = 2
    x, ctx, target = (rng.standard_normal((b, 3, 20, 28, c), dtype=np.float32) for c in (16, 96, 16))
    t = rng.uniform(0, 1000, b).astype(np.float32)
    text = rng.standard_normal((b, 7, cfg.text_dim), dtype=np.float32)
    inputs = (x, t, text, ctx, target)

    def run(opts, p, ad, x, t, text, ctx, target):  # forward and the LoRA gradient of an MSE, one compile
        v, vjp = jax.vjp(lambda ad: wan.forward(cfg, p, x, t, text, ctx, lora=ad, options=opts), ad)
        return v, vjp((v - target) / v.size)[0]

    want_v, want_g = jax.jit(functools.partial(run, wan.Options()))(params, adapters, *inputs)
    for case in cases:
        mesh = sharding.make_mesh(case["mesh"], jax.devices()[:case["devices"]])
        scan, opts = case["scan"], wan.Options(context_parallel=case["mode"], **case["opts"])
        p = wan.stack_layers(cfg, params) if scan else params
        p = jax.device_put(p, sharding.tree_shardings(wan.param_axes(cfg, stacked=scan), mesh, sharding.DEFAULT_RULES,
                                                      wan.param_shapes(cfg, stacked=scan)))
        q = p["vace_blocks"]["self_attn"]["q"]["kernel"] if scan else p["vace_blocks"]["0"]["self_attn"]["q"]["kernel"]
        assert "context" in str(q.sharding.spec), q.sharding.spec  # the weights are split over the context axis too
        lora_sh = sharding.tree_shardings(step_lib.lora_axes(lcfg, cfg, adapters.params), mesh, sharding.DEFAULT_RULES,
                                          adapters.params)
        ad = jax.device_put(adapters, lora.Lora(lora_sh, lcfg))
        put = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
        lowered = jax.jit(functools.partial(run, opts)).lower(p, ad, *map(put, inputs))
        collective = {"ulysses": "all_to_all", "ring": "collective_permute"}[case["expect"]]
        assert collective in lowered.as_text(), f"{case}: no {collective} in the lowered forward"
        got_v, got_g = lowered.compile()(p, ad, *map(put, inputs))
        name = f"{case['mesh']} {case['mode']} ({case['expect']}) {'scanned' if scan else 'flat'} {case['opts']}"
        check(name + ", forward", got_v, want_v)
        errs = jax.tree.leaves(jax.tree.map(rel, got_g.params, want_g.params))
        print(f"{name}, LoRA gradients: worst relative error {max(errs):.2e}", flush=True)
        if not max(errs) <= 1e-5:
            errors.append(f"{name}, LoRA gradients: {max(errs):.3g}")

    # Ulysses on heads the context axis cannot divide is refused with what to change; auto takes the ring
    mesh = sharding.make_mesh({"context": 4}, jax.devices()[:4])
    cfg6 = cfg.replace(dim=96, num_heads=6)
    p6 = jax.device_put(wan.init(cfg6, jax.random.key(0)), sharding.tree_shardings(
        wan.param_axes(cfg6), mesh, sharding.DEFAULT_RULES, wan.param_shapes(cfg6)))
    small = [jax.device_put(a[:, :1, :4, :4], sharding.replicated(mesh)) for a in (x, ctx)]
    args = (small[0], t, text[..., :cfg6.text_dim], small[1])
    try:
        jax.eval_shape(lambda p: wan.forward(cfg6, p, *args, options=wan.Options(context_parallel="ulysses")), p6)
        errors.append("ulysses with 6 heads over context 4 was not refused")
    except sharding.ShardingError as e:
        print("refused:", e)
        assert "context_parallel='ring'" in str(e) and "\\n" not in str(e), e
    jax.eval_shape(lambda p: wan.forward(cfg6, p, *args, options=wan.Options(context_parallel="auto")), p6)

    # the text encoder on the same kind of mesh: its tokens and weights follow the same rules ("length", "embed")
    from pickstyle_jax.models import umt5
    tcfg = umt5.Umt5Config.named("tiny")
    tparams = umt5.init(tcfg, jax.random.key(seed + 5))
    ids = jnp.asarray(rng.integers(1, tcfg.vocab_size, (2, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [9]]), jnp.int32)
    want = jax.jit(functools.partial(umt5.encode, tcfg))(tparams, ids, mask)
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    tp = sharding.shard(tparams, umt5.param_axes(tcfg), mesh)
    got = jax.jit(functools.partial(umt5.encode, tcfg))(tp, *(jax.device_put(a, sharding.batch_sharding(mesh, 2))
                                                               for a in (ids, mask)))
    check("umT5 encode on data 2 x context 4", got, want)
    assert not errors, errors
""")

_TRAIN = _PRELUDE + textwrap.dedent("""
    import importlib.util, ml_collections
    from pickstyle_jax.data import pipeline
    spec = importlib.util.spec_from_file_location("cfg", "configs/pickstyle.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    # The mesh axes each dimension is split over, size-1 axes left out.
    split = lambda a: [tuple(n for n in sharding.axes_of(e) if a.sharding.mesh.shape[n] > 1) for e in a.sharding.spec]
    flat = lambda tree: np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(tree)])
    reference = None  # the one-device step on the flat layout: the same config, seed and batch for every case
    for i, case in enumerate(json.loads(sys.argv[2])):
        c = mod.get_config("tiny")
        c.unlock()
        c.mesh = ml_collections.ConfigDict(case["mesh"])
        c.seed, c.data.batch_size, c.model.scan_layers = seed, 4, case["scan"]
        c.lock()
        tr = setup.prepare(c, os.path.join(sys.argv[3], str(i)))
        name = f"{case['mesh']} {'scanned' if case['scan'] else 'flat'} {case['jit']}"
        lora_sh = tr.abstract.shardings(tr.abstract.lora)
        state = {**tr.state, "lora": jax.device_put(random_b(tr.state["lora"], jax.random.key(seed)), lora_sh)}
        batch = setup.device_batch(tr, next(pipeline.make_iterator(c.data, seed=seed)))
        host = jax.device_get((tr.base, state, batch, tr.step_key))
        if case["jit"] == "trainer":  # its own compiled step (jit with shardings and donation, under its rules_context)
            assert tr.mesh.shape["context"] > 1, tr.mesh.shape
            assert "collective-permute" in tr.step_fn.as_text(), "the step's self-attention is not the ring"
            new, m = tr.step_fn(tr.base, state, batch, tr.step_key)
        else:  # a plain jit, no rules_context: the models pin their own layout
            a = tr.state["lora"]["vace_blocks"]["0"]["self_attn"]["q"]["A"]
            assert split(a) == [("fsdp",), ()], a.sharding.spec
            blocks = tr.base["dit"]["blocks"]
            q = blocks["self_attn"]["q"]["kernel"] if case["scan"] else blocks["0"]["self_attn"]["q"]["kernel"]
            assert split(q)[-2:] == [("fsdp",), ("tensor",)], q.sharding.spec
            new, m = jax.jit(functools.partial(step_lib.train_step, tr.cfg))(tr.base, state, batch, tr.step_key)
        if case["scan"]:  # the reference runs flat: compare the same weights
            host = ({**host[0], "dit": wan.unstack_layers(tr.cfg.wcfg, host[0]["dit"])}, *host[1:])
        if reference is None:
            reference = host, jax.jit(functools.partial(step_lib.train_step, tr.cfg))(
                *jax.device_put(host, jax.devices()[0]))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(reference[0])))
        ref_new, ref_m = reference[1]
        check(f"{name} train_step loss", m["loss"], ref_m["loss"])
        check(f"{name} train_step grad norm", m["grad_norm"], ref_m["grad_norm"])
        check(f"{name} train_step new LoRA", flat(new["lora"]), flat(ref_new["lora"]))  # the step's output state
        # The update alone is ill-conditioned: Adam's first step is lr * g / (|g| + eps), whose derivative in g is
        # lr * eps / (|g| + eps)^2, so an entry with |g| near eps turns the reduction-order rounding of a sharded sum
        # (1e-7 of the gradient norm, see the grad norm above) into up to 1e-4 of the update (seen: 5e-6 to 1.2e-4).
        d = lambda s: jax.tree.map(lambda a, b: np.asarray(a) - b, s["lora"], host[1]["lora"])
        check(f"{name} train_step LoRA update", flat(d(new)), flat(d(ref_new)), tol=1e-3)
        if case["jit"] == "plain":  # the frozen base is untouched (the trainer's step donates only the state)
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(tr.base["vae"]), host[0]["vae"])
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(tr.base["dit"]),
                         wan.stack_layers(tr.cfg.wcfg, host[0]["dit"]) if case["scan"] else host[0]["dit"])
    assert not errors, errors
""")

_run = multidevice.run


def test_forward_and_lora_gradient_over_context(seed):
    case = lambda mesh, mode, expect, scan, **opts: dict(mesh=mesh, mode=mode, expect=expect, scan=scan, opts=opts,
                                                         devices=math.prod(mesh.values()))
    # the ring in query blocks (105 queries per device in 14 blocks of 8; 210 in 14 of 15, keys in blocks of 16) and
    # the FFN in token groups of each device's block (105 tokens in 11 groups of 10; 210 in 14 groups of 15)
    cases = [case({"context": 8}, "ulysses", "ulysses", False),
             case({"context": 2}, "ring", "ring", True, attention_chunk=16, attention_kv_chunk=16, ffn_chunk=16),
             case({"context": 4}, "ring", "ring", False, attention_chunk=8, ffn_chunk=10),
             case({"data": 2, "context": 4}, "auto", "ulysses", True),
             case({"fsdp": 2, "context": 4}, "ring", "ring", False),
             case({"tensor": 2, "context": 4}, "auto", "ulysses", True)]
    _run(_MODEL, seed % 10000, json.dumps(cases))


def test_train_step_over_context(tmp_path, seed):
    """The trainer's compiled step on context 8 and on fsdp 2 x context 4, and (the old
    tests/test_sharded_model.py::test_train_step_on_8_devices) a plain jit of `step.train_step` on the scanned
    layout the real configs train with over data 2 x fsdp 2 x tensor 2, all against one one-device flat step."""
    cases = [dict(mesh=dict(data=1, fsdp=1, tensor=1, context=8), scan=False, jit="trainer"),
             dict(mesh=dict(data=1, fsdp=2, tensor=1, context=4), scan=False, jit="trainer"),
             dict(mesh=dict(data=2, fsdp=2, tensor=2, context=1), scan=True, jit="plain")]
    _run(_TRAIN, seed % 10000, json.dumps(cases), tmp_path)
