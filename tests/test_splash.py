"""Splash attention (the Pallas TPU kernel, in interpret mode off TPU) against the plain XLA softmax attention.

Token counts are deliberately not multiples of the 128 block, so padding and masking are exercised; kv_lens
masks different key counts per sample. fp32 forward and gradients must agree to 1e-5 relative L2, for the kernel
alone and inside the scanned Wan DiT with LoRA. Interpret mode is slow: shapes are tiny, one compile each.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pickstyle_jax import lora
from pickstyle_jax.models import layers, splash, wan

TOL = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def qkv(rng, b, s, t, n, m, k, dtype=np.float32):
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((b, s, n, k), (b, t, m, k), (b, t, m, k))]


def reference(q, k, v, kv_lens=None, scale=None):
    rep = q.shape[2] // k.shape[2]  # grouped-query: each kv head serves `rep` query heads
    k, v = (jnp.repeat(a, rep, axis=2) for a in (k, v))
    return layers.attention(q, k, v, implementation="xla", kv_lens=kv_lens, scale=scale)


def value_and_grads(fn, q, k, v, cot):
    """fn(q, k, v) and the gradients of <fn(q, k, v), cot> w.r.t. q, k, v, in one compile."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("s, t, use_lens", [(200, 200, True), (200, 333, False)])
def test_forward_and_gradients_match_xla(seed, s, t, use_lens):
    rng = np.random.default_rng(seed)
    b, n, kd = 2, 2, 128
    q, k, v = qkv(rng, b, s, t, n, n, kd)
    # one sample sees every key, the other a random prefix: padding and kv_lens masking in one batch
    lens = jnp.asarray([t, int(rng.integers(1, t))], jnp.int32) if use_lens else None
    cot = jnp.asarray(rng.standard_normal((b, s, n, kd)), jnp.float32)
    got_out, got = value_and_grads(
        lambda q, k, v: splash.attention(q, k, v, kv_lens=lens, block_q=128, block_kv=128), q, k, v, cot)
    want_out, want = value_and_grads(lambda q, k, v: reference(q, k, v, lens), q, k, v, cot)
    errs = {"out": rel(got_out, want_out), **{f"d{x}": rel(g, w) for x, g, w in zip("qkv", got, want)}}
    print(f"S={s} T={t} kv_lens={None if lens is None else lens.tolist()} relative L2:", errs)
    assert max(errs.values()) <= TOL, errs
    assert got_out.shape == (b, s, n, kd) and got_out.dtype == jnp.float32


def test_grouped_heads_scale_and_unpadded(seed):
    """N a multiple of M (grouped-query), an explicit scale, and S = T = a block multiple (no segment ids)."""
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 2, 256, 256, 4, 2, 128)
    got = jax.jit(lambda q, k, v: splash.attention(q, k, v, scale=0.3, block_q=256, block_kv=128))(q, k, v)
    err = rel(got, reference(q, k, v, scale=0.3))
    print("grouped-query, scale 0.3, relative L2:", err)
    assert err <= TOL


def test_bfloat16_keeps_dtype_and_is_close(seed):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, 1, 130, 130, 2, 2, 128)
    lens = jnp.asarray([100])
    got = jax.jit(lambda *a: splash.attention(*a, kv_lens=lens))(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    err = rel(got.astype(jnp.float32), reference(q, k, v, lens))
    print("bf16 vs fp32 reference, relative L2:", err)
    assert got.dtype == jnp.bfloat16 and err <= 2e-2, err


def test_clear_errors():
    q = jnp.zeros((1, 10, 2, 128))
    with pytest.raises(ValueError, match="no key_bias"):
        splash.attention(q, q, q, key_bias=jnp.zeros((10,)))
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.attention(q, q, q, block_q=100)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        splash.attention(jnp.zeros((1, 10, 3, 128)), q, q)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        splash.attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="all float32 or all bfloat16"):
        splash.attention(*(q.astype(jnp.float16),) * 3)
    with pytest.raises(ValueError, match=r"kv_lens must have shape \[B\]"):
        splash.attention(q, q, q, kv_lens=jnp.array([3, 4]))
    with pytest.raises(ValueError, match="need a mesh"):
        splash.attention(q, q, q, batch_axes="data")
    mesh = jax.sharding.AbstractMesh((2,), ("data",))
    with pytest.raises(ValueError, match="does not divide"):
        splash.attention(q, q, q, mesh=mesh, batch_axes="data")  # batch 1 over 2 devices
    with pytest.raises(ValueError, match="not in mesh"):
        splash.attention(q, q, q, mesh=mesh, head_axes="tensor")
    with pytest.raises(ValueError, match="q .* k and v"):
        splash.attention(q[0], q, q)


def test_wan_forward_and_lora_grad_splash_vs_xla(seed):
    """The DiT with attention="splash" (scanned blocks, LoRA on the self-attention) equals attention="xla"."""
    rng = np.random.default_rng(seed)
    flat = wan.WanConfig.named("tiny-t2v", num_layers=2)  # one block kind: one interpreted kernel set to compile
    params = wan.init(flat, jax.random.key(seed))
    params = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    adapters = lora.init(lora.LoraConfig(rank=4, alpha=4, targets=r"blocks\.\d+\.self_attn\.(q|k|v|o)"), params,
                         jax.random.key(seed + 1))
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # B starts at zero: make the adapters do something
    cfg = flat
    params = wan.stack_layers(cfg, params)
    b, f, h, w = 2, 3, 6, 10  # 45 tokens
    x = jnp.asarray(rng.standard_normal((b, f, h, w, 16)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((b, 11, cfg.text_dim)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, b), jnp.float32)
    lens = jnp.asarray([11, int(rng.integers(1, 11))], jnp.int32)

    def run(attention):
        opts = wan.Options(attention=attention)

        def loss(a):
            out = wan.forward(cfg, params, x, t, text, lora=a, text_lens=lens, options=opts)
            return jnp.mean(out ** 2), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
        return out, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    (got_out, got_grad), (want_out, want_grad) = run("splash"), run("xla")
    errs = {"out": rel(got_out, want_out), "dlora": rel(got_grad, want_grad)}
    print("wan splash vs xla, relative L2:", errs)
    assert max(errs.values()) <= TOL, errs
