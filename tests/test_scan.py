"""Scanned layers, the memory levers (sub-block remat, FFN token groups, offload), per-sample text folding and
attention dispatch (tiny configs, CPU)."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax import checkpoints, lora
from pickstyle_jax.models import layers, wan

jax.config.update("jax_default_matmul_precision", "highest")


def _params(cfg, seed):
    """Every leaf random (zero-init layers would hide a wrong stacking)."""
    params = wan.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return treedef.unflatten([a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _adapters(params, seed, targets=r"(vace_)?blocks\.\d+\.self_attn\.(q|v)"):
    adapters = lora.init(lora.LoraConfig(rank=3, alpha=5.0, targets=targets), params, jax.random.key(seed))
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 3), a.shape), adapters)


def _inputs(cfg, seed, b=2, f=2, h=4, w=4, text_lens=(5, 9)):
    r = np.random.default_rng(seed)
    x = r.standard_normal((b, f, h, w, cfg.in_dim), dtype=np.float32)
    t = r.uniform(0, 1000, b).astype(np.float32)
    text = r.standard_normal((b, max(text_lens), cfg.text_dim), dtype=np.float32)
    for i, n in enumerate(text_lens):
        text[i, n:] = 0
    ctx = r.standard_normal((b, f, h, w, cfg.vace_in_dim), dtype=np.float32) if cfg.has_vace else None
    return x, t, text, ctx, np.asarray(text_lens, np.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _tree_rel(g, g_ref):
    """Relative L2 error of a whole gradient tree (the 1e-6 criterion), and the worst single leaf."""
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])
    return _rel(flat(g), flat(g_ref)), max(_rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)))


def _value_and_lora_grad(cfg, params, adapters, inputs, options=None):
    x, t, text, ctx, lens = inputs

    def loss(a):
        return jnp.mean(jnp.square(wan.forward(cfg, params, x, t, text, ctx, lora=a, context_scale=0.7,
                                               text_lens=lens, options=options)))

    return jax.jit(jax.value_and_grad(loss))(adapters)


def _check_scan_equals_unrolled(cfg, seed, policies, reference="none"):
    """The scanned layout under each remat policy against one unrolled run under `reference` (remat only recomputes,
    so one unrolled reference serves every policy, and the unrolled program is the slowest to compile)."""
    params = _params(cfg, seed)
    adapters = _adapters(params, seed + 5)
    inputs = _inputs(cfg, seed + 7)
    stacked = wan.stack_layers(cfg, params)
    v_ref, g_ref = _value_and_lora_grad(cfg, params, adapters, inputs, wan.Options(remat_policy=reference))
    for policy in policies:
        opts = wan.Options(remat_policy=policy)
        v, g = _value_and_lora_grad(cfg, stacked, adapters, inputs, opts)  # the layout comes from the tree
        assert _rel(v, v_ref) <= 1e-6, (policy, seed)
        assert jax.tree.structure(g) == jax.tree.structure(g_ref)
        whole, worst_leaf = _tree_rel(g, g_ref)
        print(f"{policy}: value rel {_rel(v, v_ref):.1e}, LoRA grad rel L2 {whole:.1e} (worst leaf {worst_leaf:.1e})")
        assert whole <= 1e-6 and worst_leaf <= 1e-5, (policy, seed)
        assert all(np.abs(a).max() > 0 for a in jax.tree.leaves(g))


def test_vace_scan_equals_unrolled_with_and_without_remat(seed):
    # 6 layers, VACE after 0/3: super-blocks of one main block, the VACE block, then an inner scan over two. The
    # unrolled reference runs under remat "full" (scanned "none" against it checks the unrolled remat path too); the
    # unrolled "none" path is the reference of test_t2v_scan_equals_unrolled and the tests below.
    cfg = wan.WanConfig.named("tiny").replace(num_layers=6, vace_layers=(0, 3))
    _check_scan_equals_unrolled(cfg, seed, ("none", "full"), reference="full")


def test_t2v_scan_equals_unrolled(seed):
    _check_scan_equals_unrolled(wan.WanConfig.named("tiny-t2v").replace(num_layers=3), seed, ("full",))


def test_offload_policy_same_output_and_grad(seed):
    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0, 1))
    if wan._host_memory_kind() is None:
        with pytest.raises(ValueError, match="pinned_host"):
            _value_and_lora_grad(cfg, _params(cfg, seed), None, _inputs(cfg, seed), wan.Options(remat_policy="offload"))
        return
    params = _params(cfg, seed)
    adapters = _adapters(params, seed + 1)
    inputs = _inputs(cfg, seed + 2)
    v_ref, g_ref = _value_and_lora_grad(cfg, params, adapters, inputs, wan.Options(remat_policy="none"))
    offload = wan.Options(remat_policy="offload")
    v, g = _value_and_lora_grad(cfg, wan.stack_layers(cfg, params), adapters, inputs, offload)
    assert _rel(v, v_ref) <= 1e-6
    whole, worst_leaf = _tree_rel(g, g_ref)
    assert whole <= 1e-6 and worst_leaf <= 1e-5
    # the block inputs really go to host memory: the scan's saved residuals live in host memory space
    x, t, text, ctx, lens = inputs
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(wan.forward(cfg, wan.stack_layers(cfg, params), x, t,
                                                                  text, ctx, lora=a, options=offload))))(adapters)
    assert "f32<host>" in str(jaxpr)


def test_offload_program_for_gpu_and_tpu_moves_block_inputs_to_pinned_host():
    """What can be proven without an accelerator: XLA:CPU lowers the host transfers to nothing (its "pinned_host" is
    the same RAM), so the step is lowered here for CUDA and TPU, the StableHLO those compilers get. The main and the
    VACE block input are each annotated for pinned host memory on the way out, and for the device on the way back
    (the backward's recompute); remat "full" has no annotation. That XLA then schedules the copies and frees the
    device buffers, and the plan's device memory with offload, need the accelerator itself."""
    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0, 1))
    flat = wan.init(cfg, jax.random.key(0))  # shapes are all that matter: nothing runs
    params = wan.stack_layers(cfg, flat)
    adapters = lora.init(lora.LoraConfig(rank=3, alpha=5.0), flat, jax.random.key(1))
    x, t, text, ctx, _ = _inputs(cfg, 0, b=1, text_lens=(5,))
    s = 2 * 2 * 2  # tokens of a 2 x 4 x 4 latent in 1 x 2 x 2 patches

    def placements(policy, platform):
        opts = wan.Options(remat_policy=policy, attention="chunked")
        step = jax.jit(jax.grad(lambda a: jnp.sum(wan.forward(cfg, params, x, t, text, ctx, lora=a, options=opts))))
        text_ = step.trace(adapters).lower(lowering_platforms=(platform,)).as_text()
        calls = [line for line in text_.splitlines() if "annotate_device_placement" in line]
        return sorted((re.search(r'_xla_buffer_placement = "(\w+)"', c).group(1),
                       re.search(r"\(tensor<([^>]*)>\)", c).group(1)) for c in calls)

    for platform in ("cuda", "tpu"):
        assert placements("offload", platform) == sorted(2 * [("device", f"1x{s}x48xf32"),
                                                              ("pinned_host", f"1x{s}x48xf32")]), platform
    assert placements("full", "cuda") == []


def test_subblock_remat_and_ffn_groups_equal_no_remat(seed):
    """remat "subblock" / "nested" and FFN token groups (3 strided groups over 8 tokens: one padded) change memory,
    never the math: the loss and the LoRA gradients (adapters on self-attention and on the FFN) equal those of policy
    "none", flat and scanned, to 1e-6 relative in fp32."""
    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0, 1))
    params = _params(cfg, seed)
    adapters = _adapters(params, seed + 1, targets=r"(vace_)?blocks\.\d+\.(self_attn\.(q|v)|ffn\.0)")
    inputs = _inputs(cfg, seed + 2)
    v_ref, g_ref = _value_and_lora_grad(cfg, params, adapters, inputs, wan.Options(remat_policy="none"))
    assert all(np.abs(a).max() > 0 for a in jax.tree.leaves(g_ref))
    stacked = wan.stack_layers(cfg, params)
    # "nested" holds "subblock" inside it (flat, it is "subblock"); the inner scan's layer indices are
    # test_vace_scan_equals_unrolled's
    cases = [(params, "subblock", 3), (stacked, "nested", 3)]
    for tree, policy, ffn_chunk in cases:
        v, g = _value_and_lora_grad(cfg, tree, adapters, inputs, wan.Options(remat_policy=policy, ffn_chunk=ffn_chunk))
        whole, worst_leaf = _tree_rel(g, g_ref)
        layout = "scanned" if tree is stacked else "flat"
        print(f"{layout} {policy} ffn_chunk {ffn_chunk}: value rel {_rel(v, v_ref):.1e}, LoRA grad rel L2 {whole:.1e} "
              f"(worst leaf {worst_leaf:.1e})")
        assert _rel(v, v_ref) <= 1e-6 and whole <= 1e-6 and worst_leaf <= 1e-5, (layout, policy, ffn_chunk, seed)


def test_offload_needs_host_memory():
    class _Mem:
        kind = "device"

    class _Dev:
        def addressable_memories(self):
            return [_Mem()]

    assert wan._host_memory_kind([_Dev()]) is None


def test_stack_unstack_bit_exact_and_layout(seed):
    cfg = wan.WanConfig.named("tiny")
    flat = jax.tree.map(np.asarray, _params(cfg, seed))
    stacked = wan.stack_layers(cfg, flat)
    assert stacked["blocks"]["self_attn"]["q"]["kernel"].shape == (4, 48, 48)
    assert stacked["vace_blocks"]["after_proj"]["kernel"].shape == (2, 48, 48)
    np.testing.assert_array_equal(stacked["vace_before_proj"]["kernel"],
                                  flat["vace_blocks"]["0"]["before_proj"]["kernel"])
    np.testing.assert_array_equal(stacked["blocks"]["ffn"]["2"]["bias"][3], flat["blocks"]["3"]["ffn"]["2"]["bias"])
    back = wan.unstack_layers(cfg, stacked)
    assert jax.tree.structure(back) == jax.tree.structure(flat)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(flat)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # the stacked tree is what param_shapes / param_axes describe with stacked=True
    shape_of = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)
    assert shape_of(wan.param_shapes(cfg, stacked=True)) == shape_of(stacked)
    assert shape_of(wan.param_shapes(cfg)) == shape_of(flat)
    assert wan.is_stacked(cfg, stacked) and not wan.is_stacked(cfg, flat)
    axes = wan.param_axes(cfg, stacked=True)
    assert axes["blocks"]["self_attn"]["q"]["kernel"] == (wan.STACKED_AXIS, "embed", "heads")
    assert axes["vace_before_proj"]["kernel"] == ("embed", "heads")
    assert axes["head"]["head"]["kernel"] == ("embed", None)
    with pytest.raises(ValueError, match="already"):
        wan.stack_layers(cfg, stacked)
    with pytest.raises(ValueError, match="already in the flat layout"):
        wan.unstack_layers(cfg, flat)


def test_layout_is_read_from_the_tree_and_spacing_errors(seed):
    """A stacked tree runs scanned and a flat tree unrolled whatever options.scan_layers says (it only tells loaders
    which layout to produce); an irregular VACE spacing cannot be stacked."""
    cfg = wan.WanConfig.named("tiny")
    params = _params(cfg, seed)
    x, t, text, ctx, _ = _inputs(cfg, seed, b=1, text_lens=(3,))
    flat_out = wan.forward(cfg, params, x, t, text, ctx, options=wan.Options(scan_layers=True))
    stacked_out = wan.forward(cfg, wan.stack_layers(cfg, params), x, t, text, ctx, options=wan.Options())
    np.testing.assert_array_equal(flat_out, wan.forward(cfg, params, x, t, text, ctx, options=wan.Options()))
    assert _rel(stacked_out, flat_out) <= 1e-6
    irregular = cfg.replace(num_layers=5, vace_layers=(0, 1, 3))
    stacked_regular = wan.stack_layers(cfg, params)
    for fn in (lambda: wan.param_shapes(irregular, stacked=True),
               lambda: wan.stack_layers(irregular, wan.init(irregular, jax.random.key(0))),
               lambda: wan.forward(irregular, stacked_regular, x, t, text, ctx)):
        with pytest.raises(ValueError, match="regularly spaced vace_layers"):
            fn()
    for name in ("vace-14B", "vace-1.3B", "t2v-14B", "t2v-1.3B"):
        wan.scan_period(wan.WanConfig.named(name))  # every real variant scans


def test_options_defaults_and_validation():
    assert wan.Options.default("cpu") == wan.Options(attention_chunk=256, scan_layers=False)
    for backend in ("gpu", "tpu"):
        assert wan.Options.default(backend) == wan.Options(scan_layers=True)  # every real variant scans
    assert wan.Options.default("cpu", remat_policy="full").remat_policy == "full"
    opts = wan.Options()
    assert dataclasses.replace(opts, dtype="bfloat16").dtype == "bfloat16" and hash(opts) == hash(wan.Options())
    with pytest.raises(ValueError, match="remat_policy"):
        wan.Options(remat_policy="sometimes")
    with pytest.raises(ValueError, match="attention"):
        wan.Options(attention="flash")
    with pytest.raises(TypeError):
        wan.WanConfig.named("tiny", attention="xla")  # architecture only


def test_load_dit_scan_layers(tmp_path, seed):
    cfg = wan.WanConfig.named("tiny")
    params = jax.tree.map(np.asarray, _params(cfg, seed))
    checkpoints.save(tmp_path / "dit", cfg, wan.stack_layers(cfg, params), kind="wan")  # stored flat anyway
    meta = checkpoints.read_meta(tmp_path / "dit")
    assert set(meta["config"]) == {f.name for f in dataclasses.fields(wan.WanConfig)}
    flat_cfg, flat = checkpoints.load_dit(tmp_path / "dit")
    assert flat_cfg == cfg and "0" in flat["blocks"]
    for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    scan_cfg, stacked = checkpoints.load_dit(tmp_path / "dit", scan_layers=True)
    assert scan_cfg == cfg
    want = wan.stack_layers(cfg, params)
    assert jax.tree.structure(stacked) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_old_config_json_with_run_time_fields_loads(tmp_path, seed):
    """Checkpoints converted before the architecture/options split carry dtype, attention, scan_layers ... in
    config.json: they are ignored, never an error; unknown fields still are."""
    cfg = wan.WanConfig.named("tiny")
    params = jax.tree.map(np.asarray, _params(cfg, seed))
    checkpoints.save(tmp_path / "dit", cfg, params, kind="wan")
    path = tmp_path / "dit" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"].update(dtype="bfloat16", attention="cudnn", attention_chunk=1024, attention_kv_chunk=0,
                          splash_block_q=512, splash_block_kv=512, remat_policy="full", fold_text_padding=True,
                          scan_layers=True)
    path.write_text(json.dumps(meta))
    for scan in (False, True):
        got_cfg, got = checkpoints.load_dit(tmp_path / "dit", scan_layers=scan)
        assert got_cfg == cfg and wan.is_stacked(cfg, got) == scan
    assert checkpoints.read_config(tmp_path / "dit", "wan") == cfg
    meta["config"]["colour"] = "blue"
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointError, match="colour"):
        checkpoints.load_dit(tmp_path / "dit")


def test_text_fold_per_sample_lengths(seed):
    """Different prompt lengths in one batch: folded == unfolded (512 zero-padded rows) == each sample alone."""
    cfg = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,), text_len=64)
    params = _params(cfg, seed)
    x, t, text, ctx, lens = _inputs(cfg, seed + 1, text_lens=(4, 17))
    fwd = jax.jit(wan.forward, static_argnums=0, static_argnames=())
    folded = fwd(cfg, params, x, t, text, ctx, text_lens=lens)
    nofold = wan.Options.default(fold_text_padding=False)
    unfolded = fwd(cfg, params, x, t, text, ctx, text_lens=lens, options=nofold)
    assert _rel(folded, unfolded) <= 1e-5
    for i, n in enumerate(lens):  # each sample alone, its text trimmed to its true length
        alone = fwd(cfg, params, x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], ctx[i:i + 1], options=nofold)
        assert _rel(folded[i:i + 1], alone) <= 1e-5
    # the fold under scan
    scanned = fwd(cfg, wan.stack_layers(cfg, params), x, t, text, ctx, text_lens=lens)
    assert _rel(scanned, folded) <= 1e-6


def test_attention_auto_resolution_and_refusals():
    bf16, fp32 = jnp.bfloat16, jnp.float32
    assert layers.resolve_attention("auto", bf16, "gpu") == "cudnn"
    assert layers.resolve_attention("auto", jnp.float16, "cuda") == "cudnn"
    assert layers.resolve_attention("auto", fp32, "gpu") == "chunked"
    assert layers.resolve_attention("auto", bf16, "tpu") == "splash"
    assert layers.resolve_attention("auto", fp32, "tpu") == "splash"
    assert layers.resolve_attention("auto", bf16, "cpu") == "chunked"
    assert layers.resolve_attention("xla", bf16, "tpu") == "xla"
    with pytest.raises(ValueError, match="must be one of"):
        layers.resolve_attention("flash", bf16)
    with pytest.raises(ValueError, match="bfloat16 compute dtype"):
        wan.Options(attention="cudnn")
    q = jnp.zeros((1, 8, 2, 8), fp32)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        layers.attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="no key_bias"):
        layers.attention(q.astype(bf16), q.astype(bf16), q.astype(bf16), implementation="cudnn",
                         key_bias=jnp.zeros(8))
    with pytest.raises(ValueError, match="no key_bias"):
        layers.attention(q, q, q, implementation="splash", key_bias=jnp.zeros(8))


def test_load_base_gives_the_asked_layout(tmp_path):
    """base.load_base: the seeded random DiT of a run without a checkpoint (train's reinit_dit) or a checkpoint, in
    the layout options.scan_layers asks for; the parts not asked for are None."""
    from pickstyle_jax import base

    cfg = wan.WanConfig.named("tiny")
    flat = base.load_base(dit_config=cfg, seed=3, options=wan.Options(scan_layers=False))
    stacked = base.load_base(dit_config=cfg, seed=3, options=wan.Options(scan_layers=True))
    assert flat.vae_params is None and flat.text_params is None and flat.cfg == stacked.cfg == cfg
    assert not wan.is_stacked(cfg, flat.params) and wan.is_stacked(cfg, stacked.params)
    jax.tree.map(np.testing.assert_array_equal, flat.params, base.reinit_dit(cfg, 3))
    jax.tree.map(np.testing.assert_array_equal, stacked.params, wan.stack_layers(cfg, flat.params))
    checkpoints.save(tmp_path / "dit", cfg, flat.params, kind="wan")
    loaded = base.load_base(str(tmp_path / "dit"), options=wan.Options(scan_layers=True))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, stacked.params)
    assert base.options_from({"attention": "xla", "scan_layers": True, "dtype": ""}) == wan.Options.default(
        attention="xla", scan_layers=True)
