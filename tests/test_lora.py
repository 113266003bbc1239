"""LoRA sibling pytree: PEFT parity on the tiny diffusers VACE model, merge, B = 0, grads, targets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pickstyle_jax import lora
from pickstyle_jax.models import wan
from tests import wan_ref
from tests.conftest import SEED  # the run's seed: printed, replayable with PICKSTYLE_TEST_SEED

jax.config.update("jax_default_matmul_precision", "highest")

RANK, ALPHA = 4, 6.0  # alpha != rank so a missing alpha/rank factor shows


def seed_msg():
    return f"(seed {SEED})"


def make_inputs(cfg, r):
    x = r.standard_normal((2, 3, 6, 10, cfg.in_dim), dtype=np.float32)
    t = r.uniform(0, 1000, size=2).astype(np.float32)
    text = r.standard_normal((2, 19, cfg.text_dim), dtype=np.float32)
    text[0, 7:] = 0
    ctx = r.standard_normal((2, 3, 6, 10, cfg.vace_in_dim), dtype=np.float32)
    return x, t, text, ctx


@pytest.fixture(scope="module")
def setup():
    cfg = wan.WanConfig.named("tiny")
    model = wan_ref.make_diffusers_vace(cfg, SEED)
    params = wan_ref.flax_params_from_diffusers(model)
    return cfg, model, params


@pytest.fixture(scope="module")
def fwd():
    return jax.jit(wan.forward, static_argnums=0)


def test_peft_parity(setup, fwd):
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    cfg, model, params = setup
    peft_model = inject_adapter_in_model(
        PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=r"vace_blocks\.\d+\.attn1\.to_(q|k|v)",
                       lora_dropout=0.0),
        wan_ref.make_diffusers_vace(cfg, SEED))
    gen = torch.Generator().manual_seed(SEED)
    tree = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # [r, in], [out, r]
            a.copy_(torch.randn(a.shape, generator=gen) * 0.3)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
            _, j, _, proj = name.split(".")  # vace_blocks.{j}.attn1.to_{q,k,v}
            tree.setdefault("vace_blocks", {}).setdefault(j, {}).setdefault("self_attn", {})[proj[-1]] = {
                "A": jnp.asarray(a.numpy().T), "B": jnp.asarray(b.numpy().T)}
    adapters = lora.Lora(tree, lora.LoraConfig(rank=RANK, alpha=ALPHA))
    assert lora.adapter_paths(adapters) == lora.targets(adapters.config, params)
    x, t, text, ctx = make_inputs(cfg, np.random.default_rng(SEED))
    ref = wan_ref.diffusers_forward(peft_model, x, t, text, ctx, context_scale=0.5)
    base = wan_ref.diffusers_forward(model, x, t, text, ctx, context_scale=0.5)
    ours = fwd(cfg, params, x, t, text, ctx, lora=adapters, context_scale=0.5)
    max_abs, rel = wan_ref.errors(ours, ref)
    print(f"PEFT LoRA parity: max abs {max_abs:.2e}, rel L2 {rel:.2e}")
    assert max_abs <= 1e-4 and rel <= 1e-5, seed_msg()
    assert wan_ref.errors(base, ref)[1] > 1e-3  # the adapters do change the output

    # merge then forward == unmerged forward
    q_before = np.array(params["vace_blocks"]["1"]["self_attn"]["q"]["kernel"])
    merged = lora.merge(params, adapters)
    max_abs, rel = wan_ref.errors(fwd(cfg, merged, x, t, text, ctx, context_scale=0.5), ours)
    assert max_abs <= 1e-4 and rel <= 1e-5, seed_msg()
    # merge builds a new tree: the base params are not modified, untouched leaves are shared, not copied
    assert merged["vace_blocks"]["1"]["self_attn"]["q"] is not params["vace_blocks"]["1"]["self_attn"]["q"]
    np.testing.assert_array_equal(params["vace_blocks"]["1"]["self_attn"]["q"]["kernel"], q_before)
    o_merged, o_base = (tree["vace_blocks"]["0"]["self_attn"]["o"]["kernel"] for tree in (merged, params))
    assert o_merged is o_base
    assert merged["blocks"]["0"]["ffn"]["0"]["kernel"] is params["blocks"]["0"]["ffn"]["0"]["kernel"]
    q = adapters.params["vace_blocks"]["1"]["self_attn"]["q"]
    np.testing.assert_allclose(merged["vace_blocks"]["1"]["self_attn"]["q"]["kernel"],
                               params["vace_blocks"]["1"]["self_attn"]["q"]["kernel"] + ALPHA / RANK * q["A"] @ q["B"],
                               rtol=1e-6, atol=1e-6)


def test_init_zero_b_equals_base_and_grad(setup, fwd):
    cfg, _, params = setup
    lcfg = lora.LoraConfig(rank=RANK, alpha=ALPHA)
    adapters = lora.init(lcfg, params, jax.random.key(SEED))
    assert lora.targets(lcfg, params) == [f"vace_blocks.{j}.self_attn.{p}" for j in range(2) for p in "kqv"]
    a = adapters.params["vace_blocks"]["0"]["self_attn"]["k"]["A"]
    assert a.shape == (cfg.dim, RANK) and a.dtype == jnp.float32 and float(jnp.abs(a).max()) <= cfg.dim**-0.5
    assert adapters.params["vace_blocks"]["0"]["self_attn"]["k"]["B"].shape == (RANK, cfg.dim)
    x, t, text, ctx = make_inputs(cfg, np.random.default_rng(SEED + 1))
    np.testing.assert_allclose(fwd(cfg, params, x, t, text, ctx, lora=adapters), fwd(cfg, params, x, t, text, ctx),
                               atol=1e-6, rtol=0)

    # gradients on a one-main-block, one-VACE-block model keep the compile short
    small = cfg.replace(num_layers=1, vace_layers=(0,))
    leaves, treedef = jax.tree_util.tree_flatten(wan.param_shapes(small))
    r = np.random.default_rng(SEED + 4)
    small_params = treedef.unflatten([jnp.asarray(0.1 * r.standard_normal(l.shape), jnp.float32) for l in leaves])
    small_adapters = lora.init(lcfg, small_params, jax.random.key(SEED))

    def loss(ad, base):  # only the LoRA is differentiated; the base params are a plain argument
        return jnp.mean(jnp.square(wan.forward(small, base, x[:1, :1, :4, :4], t[:1], text[:1], ctx[:1, :1, :4, :4],
                                               lora=ad)))

    grads = jax.jit(jax.grad(loss))(small_adapters, small_params)
    assert isinstance(grads, lora.Lora) and grads.config == lcfg
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(g))
    for path in lora.adapter_paths(grads):
        *mod, proj = path.split(".")
        g = grads.params["vace_blocks"][mod[1]]["self_attn"][proj]  # vace_blocks.0.self_attn.{q,k,v}
        assert float(jnp.abs(g["B"]).max()) > 0, path  # B = 0: only B gets a gradient at init
        assert float(jnp.abs(g["A"]).max()) == 0, path


def test_targets_and_errors(setup):
    cfg, _, params = setup
    with pytest.raises(ValueError, match="matches no Dense"):
        lora.targets(lora.LoraConfig(targets=r"vace_blocks\.\d+\.nonexistent"), params)
    with pytest.raises(ValueError, match="matches no Dense"):
        lora.init(lora.LoraConfig(targets=r"self_attn\.q"), params, jax.random.key(0))  # fullmatch, not search
    ffn = lora.targets(lora.LoraConfig(targets=r"blocks\.\d+\.ffn\.(0|2)"), params)
    assert ffn == [f"blocks.{i}.ffn.{k}" for i in range(4) for k in "02"]
    stray = lora.Lora({"blocks": {"0": {"self_attn": {"nope": {"A": jnp.zeros((cfg.dim, 2)),
                                                                "B": jnp.zeros((2, cfg.dim))}}}}},
                      lora.LoraConfig(rank=2, alpha=2))
    x, t, text, ctx = make_inputs(cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="without a matching Dense"):
        wan.forward(cfg, params, x, t, text, ctx, lora=stray)


def test_main_block_and_ffn_lora_merge_equivalence(setup, fwd):
    """Adapters outside the VACE attention (main blocks, FFN, before/after projections) go through the same path."""
    cfg, _, params = setup
    lcfg = lora.LoraConfig(rank=3, alpha=1.5, targets=r"(blocks\.1\.ffn\.2|vace_blocks\.0\.before_proj|"
                                                      r"vace_blocks\.1\.after_proj|blocks\.3\.cross_attn\.o)")
    adapters = lora.init(lcfg, params, jax.random.key(SEED))
    r = np.random.default_rng(SEED + 2)
    adapters = jax.tree_util.tree_map(lambda a: jnp.asarray(0.2 * r.standard_normal(a.shape), jnp.float32), adapters)
    x, t, text, ctx = make_inputs(cfg, np.random.default_rng(SEED + 3))
    unmerged = fwd(cfg, params, x, t, text, ctx, lora=adapters)
    merged = fwd(cfg, lora.merge(params, adapters), x, t, text, ctx)
    max_abs, rel = wan_ref.errors(unmerged, merged)
    assert max_abs <= 1e-4 and rel <= 1e-5, seed_msg()
    assert wan_ref.errors(fwd(cfg, params, x, t, text, ctx), merged)[1] > 1e-3
