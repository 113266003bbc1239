"""The DiT in stages (wan.prepare -> embed -> run_blocks -> apply_head) equals wan.forward: flat and scanned layouts,
a LoRA on the per-video constants (text MLP, cross-attention k/v, VACE patch embedding), the padding fold with
uneven prompt lengths; and the stage API refuses what it cannot serve. Tiny configs, fp32, CPU."""
import jax
import numpy as np
import pytest

from pickstyle_jax import lora
from pickstyle_jax.models import wan

CFG = wan.WanConfig.named("tiny").replace(num_layers=2, vace_layers=(0,))  # few layers: quick compiles
T2V = wan.WanConfig.named("tiny-t2v").replace(num_layers=2)
# every Dense layer a per-video constant goes through, plus one per-step one
TARGETS = r".*(text_embedding\.(0|2)|cross_attn\.(k|v)|vace_patch_embedding|self_attn\.q)"


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _setup(cfg, seed, with_lora):
    rng = np.random.default_rng(seed)
    shapes = wan.param_shapes(cfg)
    params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, dtype=np.float32), shapes)
    adapters = None
    if with_lora:
        adapters = lora.init(lora.LoraConfig(rank=3, alpha=5.0, targets=TARGETS), shapes, jax.random.key(seed))
        adapters = jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, dtype=np.float32), adapters)
    x = rng.standard_normal((2, 2, 4, 6, cfg.in_dim), dtype=np.float32)
    t = np.array([937.0, 412.0], np.float32)
    text = rng.standard_normal((2, 9, cfg.text_dim), dtype=np.float32)
    ctx = rng.standard_normal((2, 2, 4, 6, cfg.vace_in_dim), dtype=np.float32) if cfg.has_vace else None
    return params, adapters, (x, t, text, ctx, np.array([4, 9], np.int32))


def _both(cfg, params, adapters, inputs):
    """(forward, forward with prepared) in one jit: the per-video constants once, then the staged forward."""
    x, t, text, ctx, lens = inputs

    def run(p, a):
        whole = wan.forward(cfg, p, x, t, text, ctx, lora=a, text_lens=lens, context_scale=0.7)
        prep = wan.prepare(cfg, p, text, ctx, lora=a, text_lens=lens)
        return whole, wan.forward(cfg, p, x, t, lora=a, context_scale=0.7, prepared=prep)

    return jax.jit(run)(params, adapters)


@pytest.mark.parametrize("name,stacked,with_lora", [("vace", False, True), ("vace", True, True),
                                                    ("t2v", True, False)])
def test_staged_forward_equals_forward(seed, name, stacked, with_lora):
    cfg = CFG if name == "vace" else T2V
    params, adapters, inputs = _setup(cfg, seed, with_lora)
    if stacked:
        params = wan.stack_layers(cfg, params)
    whole, staged = _both(cfg, params, adapters, inputs)
    err = _rel(staged, whole)
    print(f"{name} stacked={stacked} lora={with_lora}: staged vs forward rel {err:.2e}, max abs "
          f"{np.abs(np.asarray(staged) - np.asarray(whole)).max():.2e}")
    assert err <= 1e-6  # fp32; the same operations, so in practice bit-identical on CPU
    assert np.abs(np.asarray(whole)).max() > 1e-2  # the model did something


def test_prepared_constants_and_errors(seed):
    params, adapters, (x, t, text, ctx, lens) = _setup(CFG, seed, True)
    prep = jax.jit(lambda p, a: wan.prepare(CFG, p, text, ctx, lora=a, text_lens=lens))(params, adapters)
    k, v = prep.kv["blocks"]["0"]
    folded = text.shape[1] + 1  # the prompt rows plus one folded padding row
    assert k.shape == v.shape == (2, folded, CFG.num_heads, CFG.head_dim)
    assert prep.text_bias.shape == (2, folded) and prep.context.shape == (2, 2 * 2 * 3, CFG.dim)
    np.testing.assert_array_equal(np.isneginf(np.asarray(prep.text_bias))[0, 4:9], True)  # beyond text_lens[0]
    # the LoRA reaches the constants: the text K/V and the context embedding change with it
    bare = jax.jit(lambda p: wan.prepare(CFG, p, text, ctx, text_lens=lens))(params)
    assert _rel(bare.kv["blocks"]["0"][0], k) > 1e-3 and _rel(bare.context, prep.context) > 1e-3
    stacked = wan.stack_layers(CFG, params)
    with pytest.raises(ValueError, match="prepared was made for flat params"):
        wan.forward(CFG, stacked, x, t, lora=adapters, prepared=prep)
    with pytest.raises(ValueError, match="either prepared or text"):
        wan.forward(CFG, params, x, t, text, lora=adapters, prepared=prep)
    with pytest.raises(ValueError, match="prepared has batch 2, x has 1"):
        wan.forward(CFG, params, x[:1], t[:1], lora=adapters, prepared=prep)
    with pytest.raises(ValueError, match="needs prepared.context"):
        wan.forward(CFG, params, x, t, lora=adapters, prepared=prep.replace(context=None))
