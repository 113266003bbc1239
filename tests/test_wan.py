"""Wan DiT + VACE: parity with diffusers on tiny random models, properties, layers against float64 references."""
import dataclasses
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax.models import layers, wan
from tests import wan_ref

jax.config.update("jax_default_matmul_precision", "highest")

SEED = int(time.time_ns() % 2**31)


def rng(offset=0):
    return np.random.default_rng(SEED + offset)


def seed_msg():
    return f"(seed {SEED})"


def _assert_same_tree(cfg, ref):
    a = jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(lambda k: wan.init(cfg, k), jax.random.key(0)))
    b = jax.tree_util.tree_map(lambda x: tuple(x.shape), ref)
    assert a == b


# ----------------------------------------------------------------------------- inputs


SMALL = dict(b=1, f=2, h=4, w=6, text_lens=(9,))  # shared by the property tests: one fp32 compile


def make_inputs(cfg, b=2, f=3, h=6, w=10, text_lens=(7, 19), r=None):
    r = r or rng()
    x = r.standard_normal((b, f, h, w, cfg.in_dim), dtype=np.float32)
    t = r.uniform(0, 1000, size=b).astype(np.float32)
    text = r.standard_normal((b, max(text_lens), cfg.text_dim), dtype=np.float32)
    for i, n in enumerate(text_lens):  # per-sample true lengths, zeros beyond (what the text encoder gives)
        text[i, n:] = 0
    ctx = r.standard_normal((b, f, h, w, cfg.vace_in_dim), dtype=np.float32) if cfg.has_vace else None
    return x, t, text, ctx


@pytest.fixture(scope="module")
def vace_setup():
    cfg = wan.WanConfig.named("tiny")
    model = wan_ref.make_diffusers_vace(cfg, SEED)
    params = wan_ref.flax_params_from_diffusers(model)
    return cfg, model, params


@pytest.fixture(scope="module")
def jit_forward():
    return jax.jit(wan.forward, static_argnums=0)


# ----------------------------------------------------------------------------- parity


def test_param_tree_matches_init_and_axes(vace_setup):
    cfg, _, params = vace_setup
    _assert_same_tree(cfg, params)
    axes = wan.param_axes(cfg)
    shapes = jax.tree_util.tree_map(lambda x: len(x.shape), params)
    assert jax.tree_util.tree_map(len, axes, is_leaf=lambda x: isinstance(x, tuple)) == shapes


def test_vace_parity_with_diffusers(vace_setup, jit_forward):
    cfg, model, params = vace_setup
    x, t, text, ctx = make_inputs(cfg)
    ref = wan_ref.diffusers_forward(model, x, t, text, ctx, context_scale=0.5)
    ours = jit_forward(cfg, params, x, t, text, ctx, context_scale=0.5)
    assert ours.dtype == jnp.float32 and ours.shape == x.shape
    max_abs, rel = wan_ref.errors(ours, ref)
    print(f"VACE parity: max abs {max_abs:.2e}, rel L2 {rel:.2e}")
    assert max_abs <= 1e-4 and rel <= 1e-5, seed_msg()


def test_vace_per_layer_context_scale(vace_setup, jit_forward):
    cfg, model, params = vace_setup
    x, t, text, ctx = make_inputs(cfg, b=1, f=2, h=4, w=4, text_lens=(5,))
    scale = np.array([0.3, 1.7], np.float32)
    max_abs, rel = wan_ref.errors(jit_forward(cfg, params, x, t, text, ctx, context_scale=scale),
                          wan_ref.diffusers_forward(model, x, t, text, ctx, context_scale=scale))
    assert max_abs <= 1e-4 and rel <= 1e-5, seed_msg()


def test_t2v_parity_with_diffusers(jit_forward):
    cfg = wan.WanConfig.named("tiny-t2v")
    model = wan_ref.make_diffusers_t2v(cfg, SEED + 1)
    params = wan_ref.flax_params_from_diffusers(model)
    _assert_same_tree(cfg, params)
    x, t, text, _ = make_inputs(cfg)
    unfolded = wan.Options.default(fold_text_padding=False)  # also covers the unfolded 512-row text path
    max_abs, rel = wan_ref.errors(jit_forward(cfg, params, x, t, text, options=unfolded),
                                  wan_ref.diffusers_forward(model, x, t, text))
    print(f"T2V parity: max abs {max_abs:.2e}, rel L2 {rel:.2e}")
    assert max_abs <= 1e-4 and rel <= 1e-5, seed_msg()


# ----------------------------------------------------------------------------- properties


def test_context_scale_zero_ignores_context(vace_setup, jit_forward):
    cfg, _, params = vace_setup
    x, t, text, ctx = make_inputs(cfg, **SMALL)
    a = jit_forward(cfg, params, x, t, text, ctx, context_scale=0.0)
    b = jit_forward(cfg, params, x, t, text, 3.0 * rng(5).standard_normal(ctx.shape).astype(np.float32),
                    context_scale=0.0)
    c = jit_forward(cfg, params, x, t, text, ctx, context_scale=1.0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


BF16_REL_L2_BOUND = 1e-2  # measured 3.6e-3 .. 4.5e-3 over 6 seeds (bf16 params and matmul inputs, fp32 elsewhere)


def test_bf16_forward_close_to_fp32(vace_setup, jit_forward):
    cfg, _, params = vace_setup
    cfg16 = cfg.replace(param_dtype="bfloat16")
    params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    x, t, text, ctx = make_inputs(cfg, **SMALL)
    ref = jit_forward(cfg, params, x, t, text, ctx)
    out = jit_forward(cfg16, params16, x, t, text, ctx, options=wan.Options.default(dtype="bfloat16"))
    assert out.dtype == jnp.float32
    _, rel = wan_ref.errors(out, ref)
    print(f"bf16 vs fp32 rel L2 {rel:.2e}")
    assert rel <= BF16_REL_L2_BOUND, seed_msg()


def test_chunked_attention_forward_equals_xla(vace_setup, jit_forward):
    cfg, _, params = vace_setup
    x, t, text, ctx = make_inputs(cfg, **SMALL)
    ref = jit_forward(cfg, params, x, t, text, ctx)
    # query blocks of 5 over S = 12 (padded last block) in self- and cross-attention (with the text fold's
    # bias), keys streamed in blocks of 5 (each key step rematerialised); plain query chunking
    # is covered by test_chunked_attention_equals_xla
    out = jit_forward(cfg, params, x, t, text, ctx,
                      options=wan.Options(attention="chunked", attention_chunk=5, attention_kv_chunk=5))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5, err_msg=seed_msg())


def test_remat_policies_same_output_and_grad(vace_setup):
    cfg, _, _ = vace_setup
    cfg = cfg.replace(num_layers=1, vace_layers=(0,))  # one main and one VACE block keep the grad compiles short
    leaves, treedef = jax.tree_util.tree_flatten(wan.param_shapes(cfg))
    r = rng(6)
    params = treedef.unflatten([0.1 * r.standard_normal(l.shape).astype(np.float32) for l in leaves])
    x, t, text, ctx = make_inputs(cfg, b=1, f=1, h=4, w=4, text_lens=(4,))

    def loss(p, opts):
        return jnp.mean(jnp.square(wan.forward(cfg, p, x, t, text, ctx, options=opts)))

    results = {}
    for policy in ("none", "full"):
        results[policy] = jax.jit(jax.value_and_grad(loss))(params, wan.Options.default(remat_policy=policy))
    (value, grads), (value_ref, grads_ref) = results["full"], results["none"]
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(results["full"][1]))


def test_bad_inputs_raise(vace_setup):
    cfg, _, params = vace_setup
    x, t, text, ctx = make_inputs(cfg, b=1, f=1, h=4, w=4, text_lens=(4,))
    cases = [
        ((x[..., :8], t, text, ctx), "channels-last"),
        ((x[:, :, :3], t, text, ctx[:, :, :3]), "divisible"),
        ((x, t, np.zeros((1, 513, cfg.text_dim), np.float32), ctx), "exceeds text_len"),
        ((x, t, text[..., :5], ctx), "text must be"),
        ((x, np.zeros(3, np.float32), text, ctx), "t must have shape"),
        ((x, t, text, None), "needs vace_context"),
        ((x, t, text, ctx[..., :16]), "vace_context must have shape"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            wan.forward(cfg, params, *args)
    with pytest.raises(ValueError, match="context_scale"):
        wan.forward(cfg, params, x, t, text, ctx, context_scale=np.ones(3))
    t2v = wan.WanConfig.named("tiny-t2v")
    with pytest.raises(ValueError, match="no VACE layers"):
        wan.forward(t2v, None, x, t, text, ctx)  # inputs are checked before params are touched
    with pytest.raises(ValueError):
        wan.Options(remat_policy="sometimes")


def test_named_configs():
    for name, d, layers_, vace in (("vace-14B", 5120, 40, 8), ("vace-1.3B", 1536, 30, 15), ("t2v-14B", 5120, 40, 0),
                                   ("t2v-1.3B", 1536, 30, 0)):
        cfg = wan.WanConfig.named(name)
        assert (cfg.dim, cfg.num_layers, len(cfg.vace_layers), cfg.head_dim) == (d, layers_, vace, 128)
        n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(wan.param_shapes(cfg)))
        expected = {"vace-14B": 17.338e9, "vace-1.3B": 2.154e9, "t2v-14B": 14.288e9, "t2v-1.3B": 1.419e9}[name]
        assert abs(n - expected) < 1e-3 * expected, (name, n)
    cfg = wan.WanConfig.named("tiny")
    import json
    assert wan.WanConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


# ----------------------------------------------------------------------------- layers


def test_sinusoid_against_float64():
    t = np.concatenate([[0.0, 1.0, 999.0, 1000.0], rng(2).uniform(0, 1000, 256)]).astype(np.float32)
    ours = np.asarray(jax.jit(layers.timestep_embedding, static_argnums=1)(t, 256))
    arg = np.outer(t.astype(np.float64), 10000.0 ** (-np.arange(128) / 128))
    ref = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
    err = np.abs(ours - ref).max()
    print(f"sinusoid vs float64: max abs {err:.2e}")  # plain fp32 evaluation: ~6e-5
    assert err <= 1e-6, seed_msg()


def test_rope_against_complex128():
    head_dim, grid = 128, (3, 5, 7)
    cos, sin = layers.rope_freqs(head_dim, grid)
    x = rng(3).standard_normal((2, int(np.prod(grid)), 2, head_dim)).astype(np.float32)
    ours = np.asarray(jax.jit(layers.apply_rope)(x, cos, sin))
    # official rope_params/rope_apply: per-axis complex tables with base dims 44 / 42 / 42, frame-major grid
    dt, dh, dw = layers.rope_split(head_dim)
    tables = [np.exp(1j * np.outer(np.arange(1024), 1.0 / 10000 ** (np.arange(0, d, 2) / d))) for d in (dt, dh, dw)]
    f, h, w = grid
    freqs = np.concatenate([
        np.broadcast_to(tables[0][:f, None, None], (f, h, w, dt // 2)),
        np.broadcast_to(tables[1][None, :h, None], (f, h, w, dh // 2)),
        np.broadcast_to(tables[2][None, None, :w], (f, h, w, dw // 2))], axis=-1).reshape(-1, 1, head_dim // 2)
    xc = x.astype(np.float64).reshape(*x.shape[:-1], -1, 2)
    ref = (xc[..., 0] + 1j * xc[..., 1]) * freqs
    ref = np.stack([ref.real, ref.imag], -1).reshape(x.shape)
    err = np.abs(ours - ref).max()
    print(f"RoPE vs complex128: max abs {err:.2e}")
    assert err <= 1e-6, seed_msg()
    assert layers.rope_split(24) == (8, 8, 8) and layers.rope_split(128) == (44, 42, 42)


@pytest.mark.parametrize("kv_lens", [None, (70, 33)])
def test_chunked_attention_equals_xla(kv_lens):
    r = rng(4)
    q, k, v = (r.standard_normal((2, 70, 3, 16)).astype(np.float32) for _ in range(3))
    lens = None if kv_lens is None else jnp.asarray(kv_lens)
    attn = jax.jit(layers.attention, static_argnames=("implementation", "chunk_size", "kv_chunk_size"))
    ref = attn(q, k, v, implementation="xla", kv_lens=lens)
    for chunk, kv_chunk in ((16, None), (70, None), (32, 24)):
        out = attn(q, k, v, implementation="chunked", kv_lens=lens, chunk_size=chunk, kv_chunk_size=kv_chunk)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=seed_msg())
    # the plain path against a float64 numpy softmax
    logits = np.einsum("bsnk,btnk->bnst", q.astype(np.float64), k) / 4.0
    if kv_lens is not None:
        logits = np.where(np.arange(70)[None, None, None] < np.asarray(kv_lens)[:, None, None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bnst,btnk->bsnk", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(ref, want, atol=1e-5, rtol=1e-5)


def test_key_bias_equals_repeated_keys():
    """The identity behind fold_text_padding: m copies of one key == that key once with logit bias log(m)."""
    r = rng(7)
    q = r.standard_normal((2, 9, 2, 8)).astype(np.float32)
    k, v = (r.standard_normal((2, 5, 2, 8)).astype(np.float32) for _ in range(2))
    m = 37
    k_rep, v_rep = (np.concatenate([a, np.repeat(a[:, -1:], m - 1, axis=1)], axis=1) for a in (k, v))
    bias = np.zeros(5, np.float32)
    bias[-1] = np.log(m)
    ref = layers.attention(q, k_rep, v_rep)
    for impl, kw in (("xla", {}), ("chunked", dict(chunk_size=4)), ("chunked", dict(chunk_size=4, kv_chunk_size=2))):
        out = layers.attention(q, k, v, implementation=impl, key_bias=bias, **kw)
        np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-5, err_msg=seed_msg())


def _max_intermediate_elems(jaxpr):
    """Largest array produced by any equation, including inside scans/maps/checkpoints."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            biggest = max(biggest, _max_intermediate_elems(sub))
    return biggest


def test_chunked_attention_never_builds_full_score_matrix():
    s, n, kd = 4096, 2, 8
    q = jax.ShapeDtypeStruct((1, s, n, kd), jnp.float32)
    xla = jax.make_jaxpr(lambda a, b, c: layers.attention(a, b, c, implementation="xla"))(q, q, q)
    assert _max_intermediate_elems(xla.jaxpr) >= s * s * n
    for kv_chunk in (None, 512):
        fn = lambda a, b, c: layers.attention(a, b, c, implementation="chunked", chunk_size=256,
                                              kv_chunk_size=kv_chunk)
        for jaxpr in (jax.make_jaxpr(fn)(q, q, q),
                      jax.make_jaxpr(jax.grad(lambda a, b, c: fn(a, b, c).sum(), argnums=(0, 1, 2)))(q, q, q)):
            assert _max_intermediate_elems(jaxpr.jaxpr) <= 256 * s * n  # one query block of logits at most


def test_chunked_attention_balances_query_blocks():
    """Equal query blocks of at most chunk_size: 1,280 queries at chunk 1,024 run as 2 x 640 (the accelerator default
    once computed 768 padded rows here); exact, so the result still equals the plain path."""
    assert layers.query_blocks(1280, 1024) == (2, 640)
    assert layers.query_blocks(1280, 256) == (5, 256)
    assert layers.query_blocks(32760, 256) == (128, 256)  # 8 padded rows at 81 x 480 x 832
    assert layers.query_blocks(70, 16) == (5, 14) and layers.query_blocks(5, 1024) == (1, 5)
    s, n, kd = 1280, 1, 8
    q = jax.ShapeDtypeStruct((1, s, n, kd), jnp.float32)
    fn = lambda a, b, c: layers.attention(a, b, c, implementation="chunked", chunk_size=1024)
    assert _max_intermediate_elems(jax.make_jaxpr(fn)(q, q, q).jaxpr) == 640 * s * n
