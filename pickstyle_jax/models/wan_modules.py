"""The Wan2.1 DiT's modules (attention, main and VACE blocks, head, the whole model) and the per-call context `Ctx`
they read; `wan.py` holds the config, parameters and the forward, and re-exports the module classes
(`wan.WanModel`, `wan.WanBlock`, ...). Dimension key: `wan.py`'s. A `cfg` here is a `wan.WanConfig` (not
imported: `wan` imports this module).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pickstyle_jax.models import layers
from pickstyle_jax.models.wan_inputs import patchify
from pickstyle_jax.models.wan_options import Options

f32 = jnp.float32

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESIDUAL_AXES = ("batch", "length", "embed")  # sharding of the [B, S, D] streams at block boundaries
HEAD_AXES = ("batch", "length", "heads", None)  # [B, S, N, K]: whole heads per device
TEXT_HEAD_AXES = ("batch", None, "heads", None)  # [B, L, N, K] text keys: whole on every device (not "length")
MOD_AXES = (None, "mod", "embed")  # the modulation tables [1, rows, D]
SUBBLOCK = ("subblock", "nested")  # remat policies that rematerialise each sub-block again (wan_options.py)


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Per-call values every block reads: options, compute dtype, LoRA scale, RoPE tables, embedded text and its
    bias."""
    cfg: Any  # wan.WanConfig
    opts: Options
    dtype: Any
    lora_scale: float
    rope: Any = None
    text_BLD: Any = None
    text_bias: Any = None
    tokens: int = 0  # video tokens S (before the context axis's padding)
    padded: int = 0  # S rounded up to a multiple of the devices the layout splits tokens over (layers.context_shards)


def subtree(tree, *keys):
    """tree[k0][k1]..., or None where a key is absent (LoRA trees only cover adapted layers)."""
    for key in keys:
        if tree is None or key not in tree:
            return None
        tree = tree[key]
    return tree


def lora_dense(ctx: Ctx, layer: layers.Dense, x, lp, *path, out_dtype=None, dtype=None):
    """Dense `layer` with the LoRA adapter at lp[path] (if any), inputs in the compute dtype (or `dtype`)."""
    return layer(x, dtype=dtype or ctx.dtype, out_dtype=out_dtype, adapter=subtree(lp, *path),
                 lora_scale=ctx.lora_scale)


def _modulation(cfg, rngs, rows):
    """Official init of the modulation tables: N(0, 1) / sqrt(D)."""
    value = jax.random.normal(rngs.params(), (1, rows, cfg.dim), f32) / math.sqrt(cfg.dim)
    return layers.param(value.astype(DTYPES[cfg.param_dtype]), MOD_AXES)


def _split_heads(ctx: Ctx, a_BLD, axes=HEAD_AXES):
    """[B, L, D] -> [B, L, N, K] in the compute dtype, whole heads per device (video tokens split like the stream;
    text keys, axes=TEXT_HEAD_AXES, whole on every device)."""
    b, n, _ = a_BLD.shape
    return layers.constrain(a_BLD.reshape(b, n, ctx.cfg.num_heads, ctx.cfg.head_dim).astype(ctx.dtype), axes)


class Attention(nnx.Module):
    """q, k, v, o projections and the q/k RMSNorms over all heads (official `self_attn` / `cross_attn`)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, pd = cfg.dim, DTYPES[cfg.param_dtype]
        for name in ("q", "k", "v"):
            setattr(self, name, layers.Dense(d, d, ("embed", "heads"), rngs=rngs, param_dtype=pd))
        self.o = layers.Dense(d, d, ("heads", "embed"), rngs=rngs, param_dtype=pd)
        self.norm_q = layers.RMSNorm(d, ("heads",), eps=cfg.eps, param_dtype=pd)
        self.norm_k = layers.RMSNorm(d, ("heads",), eps=cfg.eps, param_dtype=pd)

    def self_attention(self, ctx: Ctx, y_BSD, lp):
        cfg, opts = ctx.cfg, ctx.opts
        b, s, _ = y_BSD.shape
        split = lambda a: layers.constrain(a.reshape(b, s, cfg.num_heads, cfg.head_dim), HEAD_AXES)

        def project(y_BSD):
            q_BSD = self.norm_q(lora_dense(ctx, self.q, y_BSD, lp, "q", out_dtype=f32))
            k_BSD = self.norm_k(lora_dense(ctx, self.k, y_BSD, lp, "k", out_dtype=f32))
            v_BSNK = split(lora_dense(ctx, self.v, y_BSD, lp, "v"))
            # 1/sqrt(K) is folded into q while it is still fp32
            q_BSNK = (layers.apply_rope(split(q_BSD), *ctx.rope) * cfg.head_dim**-0.5).astype(ctx.dtype)
            k_BSNK = layers.apply_rope(split(k_BSD), *ctx.rope).astype(ctx.dtype)
            return q_BSNK, k_BSNK, v_BSNK

        # "subblock": the fp32 projections, norms and RoPE are recomputed in their own backward, apart from the
        # attention's
        q_BSNK, k_BSNK, v_BSNK = (_checkpoint(project) if opts.remat_policy in SUBBLOCK else project)(y_BSD)
        # tokens split over a context axis meet here (Ulysses or ring, layers.self_attention); padded keys masked
        out_BSNK = layers.self_attention(q_BSNK, k_BSNK, v_BSNK, kv_len=ctx.tokens,
                                         context_parallel=opts.context_parallel, implementation=opts.attention,
                                         scale=1.0, chunk_size=opts.attention_chunk,
                                         kv_chunk_size=opts.attention_kv_chunk or None,
                                         block_q=opts.splash_block_q, block_kv=opts.splash_block_kv)
        out_BSNK = layers.constrain(out_BSNK, HEAD_AXES)
        return lora_dense(ctx, self.o, out_BSNK.reshape(b, s, cfg.dim), lp, "o", out_dtype=f32)

    def text_kv(self, ctx: Ctx, text_BLD, lp):
        """The cross-attention key and value of the embedded text: ([B, L, N, K], [B, L, N, K]) in the compute
        dtype, k after norm_k. They depend on the text (and the weights) only, so `prepare` computes them once per
        video."""
        k_BLD = self.norm_k(lora_dense(ctx, self.k, text_BLD, lp, "k", out_dtype=f32))
        return (_split_heads(ctx, k_BLD, TEXT_HEAD_AXES),
                _split_heads(ctx, lora_dense(ctx, self.v, text_BLD, lp, "v"), TEXT_HEAD_AXES))

    def cross_attention(self, ctx: Ctx, y_BSD, lp, kv=None):
        """kv: this block's (k, v) from `text_kv` (a `Prepared`'s), or None to compute them from ctx.text_BLD."""
        cfg, opts = ctx.cfg, ctx.opts
        b, s, _ = y_BSD.shape
        q_BSD = self.norm_q(lora_dense(ctx, self.q, y_BSD, lp, "q", out_dtype=f32)) * cfg.head_dim**-0.5
        k_BLNK, v_BLNK = self.text_kv(ctx, ctx.text_BLD, lp) if kv is None else kv
        # <= 513 text keys: no key blocks needed, but long videos take query blocks (the [B, N, S, 513] fp32
        # logits of 81 x 480 x 832 are 2.5 GiB per copy at 14B); both paths take the fold's logit bias
        impl = "chunked" if s > opts.attention_chunk and opts.attention != "xla" else "xla"
        # each device's query block against the whole text (layers.cross_attention), however the tokens are split
        out_BSNK = layers.cross_attention(_split_heads(ctx, q_BSD), k_BLNK, v_BLNK, implementation=impl, scale=1.0,
                                          key_bias=ctx.text_bias, chunk_size=opts.attention_chunk)
        out_BSNK = layers.constrain(out_BSNK, HEAD_AXES)
        return lora_dense(ctx, self.o, out_BSNK.reshape(b, s, cfg.dim), lp, "o", out_dtype=f32)


class WanBlock(nnx.Module):
    """One Wan attention block on the fp32 residual stream."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, pd = cfg.dim, DTYPES[cfg.param_dtype]
        self.modulation = _modulation(cfg, rngs, 6)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.norm3 = layers.LayerNorm(d, ("embed",), eps=cfg.eps, param_dtype=pd)
        self.cross_attn = Attention(cfg, rngs=rngs)
        self.ffn = nnx.Dict({"0": layers.Dense(d, cfg.ffn_dim, ("embed", "mlp"), rngs=rngs, param_dtype=pd),
                             "2": layers.Dense(cfg.ffn_dim, d, ("mlp", "embed"), rngs=rngs, param_dtype=pd)})

    def __call__(self, ctx: Ctx, x_BSD, e0_B6D, lp, kv=None):
        """kv: the cross-attention's precomputed text (k, v) (`Attention.text_kv`), or None."""
        eps = ctx.cfg.eps
        m_B6D = layers.gathered(self.modulation[...], MOD_AXES).astype(f32) + e0_B6D
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (m_B6D[:, k, None, :] for k in range(6))

        def self_attn(x_BSD):
            y_BSD = layers.layer_norm(x_BSD, eps=eps) * (1 + scale_msa) + shift_msa
            return x_BSD + gate_msa * self.self_attn.self_attention(ctx, y_BSD, subtree(lp, "self_attn"))

        def cross_attn(x_BSD):
            return x_BSD + self.cross_attn.cross_attention(ctx, self.norm3(x_BSD), subtree(lp, "cross_attn"), kv)

        def ffn(x_BSD):  # token by token: any grouping of the tokens gives the same rows
            y_BSD = layers.layer_norm(x_BSD, eps=eps) * (1 + scale_ffn) + shift_ffn
            h_BSF = layers.gelu_tanh(lora_dense(ctx, self.ffn["0"], y_BSD, lp, "ffn", "0"))
            return x_BSD + gate_ffn * lora_dense(ctx, self.ffn["2"], h_BSF, lp, "ffn", "2", out_dtype=f32)

        # "subblock": the backward of the (already rematerialised) block keeps only the sub-blocks' fp32 inputs
        # and recomputes one sub-block's intermediates at a time
        sub = _checkpoint if ctx.opts.remat_policy in SUBBLOCK else (lambda fn: fn)
        x_BSD = sub(self_attn)(x_BSD)
        x_BSD = sub(cross_attn)(x_BSD)
        x_BSD = _token_groups(ffn, x_BSD, ctx.opts.ffn_chunk) if ctx.opts.ffn_chunk else sub(ffn)(x_BSD)
        return layers.constrain(x_BSD, RESIDUAL_AXES)


def _checkpoint(fn):
    """fn rematerialised: its backward keeps only fn's inputs."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


def _token_groups(fn, x_BSD, chunk: int):
    """fn (which treats every token on its own) on groups of at most `chunk` tokens, one group at a time, each
    rematerialised: fn's [B, chunk, ...] intermediates are alive for one group only, forward and backward.

    Where the enclosing layout splits the tokens over c devices (`layers.context_shards`), each device's S/c tokens
    are grouped alike: group k holds, from every device's block, its tokens k, k + n, k + 2n, ... (n groups, the
    padding < n tokens per block). A group is then split over the same devices as the tokens, and nothing moves
    between them (a strided grouping of all S tokens would, unless n divided S/c); with c = 1 it is the strided
    grouping of all S tokens."""
    b, s, d = x_BSD.shape
    c = layers.context_shards()
    c = c if s % c == 0 else 1
    local = s // c
    n = -(-local // chunk)
    if n == 1:
        return _checkpoint(fn)(x_BSD)
    per = -(-local // n)  # tokens per group and device block, balanced: the padding is < n tokens per block
    x_BCLD = jnp.pad(x_BSD.reshape(b, c, local, d), ((0, 0), (0, 0), (0, n * per - local), (0, 0)))
    x_GBSD = jnp.moveaxis(x_BCLD.reshape(b, c, per, n, d), 3, 0).reshape(n, b, c * per, d)
    y_GBSD = jax.lax.map(_checkpoint(fn), x_GBSD)
    y_BCLD = jnp.moveaxis(y_GBSD.reshape(n, b, c, per, d), 0, 3).reshape(b, c, n * per, d)
    return y_BCLD[:, :, :local].reshape(b, s, d)


class VaceBlock(WanBlock):
    """VACE block j: a Wan block plus after_proj (the hint); block 0 also owns before_proj."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, first: bool = False):
        super().__init__(cfg, rngs=rngs)
        d, pd = cfg.dim, DTYPES[cfg.param_dtype]
        # D -> D projections outside attention: output axis named like an attention projection's
        if first:
            self.before_proj = layers.Dense(d, d, ("embed", "heads"), rngs=rngs, kernel_init=layers.zeros,
                                            param_dtype=pd)
        self.after_proj = layers.Dense(d, d, ("heads", "embed"), rngs=rngs, kernel_init=layers.zeros, param_dtype=pd)

    def __call__(self, ctx: Ctx, c_BSD, x0_BSD, e0_B6D, lp, kv=None):
        """(hint_j, c); c enters through before_proj (+ x0) in block 0 only."""
        if hasattr(self, "before_proj"):
            c_BSD = lora_dense(ctx, self.before_proj, c_BSD, lp, "before_proj", out_dtype=f32) + x0_BSD
        c_BSD = super().__call__(ctx, c_BSD, e0_B6D, lp, kv)
        return lora_dense(ctx, self.after_proj, c_BSD, lp, "after_proj", out_dtype=f32), c_BSD


class Head(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.head = layers.Dense(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim, ("embed", None), rngs=rngs,
                                 kernel_init=layers.zeros, param_dtype=DTYPES[cfg.param_dtype])
        self.modulation = _modulation(cfg, rngs, 2)

    def __call__(self, ctx: Ctx, x_BSD, e_BD, lp):
        """fp32 output projection, modulated by e (not e0)."""
        m_B2D = layers.gathered(self.modulation[...], MOD_AXES).astype(f32) + e_BD[:, None, :]
        y_BSD = layers.layer_norm(x_BSD, eps=ctx.cfg.eps) * (1 + m_B2D[:, 1, None, :]) + m_B2D[:, 0, None, :]
        return lora_dense(ctx, self.head, y_BSD, lp, "head", out_dtype=f32, dtype=f32)


class WanModel(nnx.Module):
    """The DiT (+ VACE). `blocks=False` builds only the embeddings and the head (the scanned forward binds the
    stacked blocks one layer at a time)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, blocks: bool = True):
        d, pd, patch = cfg.dim, DTYPES[cfg.param_dtype], math.prod(cfg.patch_size)
        dense = functools.partial(layers.Dense, rngs=rngs, param_dtype=pd)
        normal = layers.normal(0.02)
        self.patch_embedding = dense(patch * cfg.in_dim, d, (None, "embed"))
        self.text_embedding = nnx.Dict({"0": dense(cfg.text_dim, d, (None, "embed"), kernel_init=normal),
                                        "2": dense(d, d, ("embed", "heads"), kernel_init=normal)})
        self.time_embedding = nnx.Dict({"0": dense(cfg.freq_dim, d, (None, "embed"), kernel_init=normal),
                                        "2": dense(d, d, ("embed", "heads"), kernel_init=normal)})
        self.time_projection = nnx.Dict({"1": dense(d, 6 * d, ("embed", "mod"))})
        if blocks:
            self.blocks = nnx.Dict({str(i): WanBlock(cfg, rngs=rngs) for i in range(cfg.num_layers)})
        self.head = Head(cfg, rngs=rngs)
        if cfg.has_vace:
            self.vace_patch_embedding = dense(patch * cfg.vace_in_dim, d, (None, "embed"))
            if blocks:
                self.vace_blocks = nnx.Dict({str(j): VaceBlock(cfg, rngs=rngs, first=j == 0)
                                             for j in range(len(cfg.vace_layers))})

    def embed(self, ctx: Ctx, x, t, text_BLC, vace_context, lp):
        """(x0 [B,S,D], c [B,S,D] or None (before before_proj), e [B,D], e0 [B,6,D], text [B,L',D])."""
        x0_BSD, e_BD, e0_B6D = self.embed_latents(ctx, x, t, lp)
        text_BLD = self.embed_text(ctx, text_BLC, lp)
        c_BSD = self.embed_context(ctx, vace_context, lp) if ctx.cfg.has_vace else None
        return x0_BSD, c_BSD, e_BD, e0_B6D, text_BLD

    def embed_latents(self, ctx: Ctx, x, t, lp):
        """What changes every step: (x0 [B,S,D] fp32 patch tokens, e [B,D], e0 [B,6,D]) of latents x at times t."""
        cfg, b = ctx.cfg, x.shape[0]
        fp32 = dataclasses.replace(ctx, dtype=f32)
        x0_BSD = lora_dense(ctx, self.patch_embedding, patch_tokens(ctx, x), lp, "patch_embedding", out_dtype=f32)
        # time conditioning, fp32 throughout
        sinusoid_BT = layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(t, f32), (b,)), cfg.freq_dim)
        te = self.time_embedding
        h_BD = jax.nn.silu(lora_dense(fp32, te["0"], sinusoid_BT, lp, "time_embedding", "0"))
        e_BD = lora_dense(fp32, te["2"], h_BD, lp, "time_embedding", "2")
        e0_B6D = lora_dense(fp32, self.time_projection["1"], jax.nn.silu(e_BD), lp, "time_projection", "1")
        return layers.constrain(x0_BSD, RESIDUAL_AXES), e_BD, e0_B6D.reshape(b, 6, cfg.dim)

    def embed_text(self, ctx: Ctx, text_BLC, lp):
        """The text MLP: [B, L', text_dim] (already folded) -> [B, L', D] in the compute dtype."""
        tx = self.text_embedding
        text_BLD = layers.gelu_tanh(lora_dense(ctx, tx["0"], text_BLC, lp, "text_embedding", "0"))
        return lora_dense(ctx, tx["2"], text_BLD, lp, "text_embedding", "2")

    def embed_context(self, ctx: Ctx, vace_context, lp):
        """The VACE context's patch embedding [B, S, D] fp32 (before vace_blocks.0.before_proj)."""
        c_BSD = lora_dense(ctx, self.vace_patch_embedding, patch_tokens(ctx, vace_context), lp, "vace_patch_embedding",
                     out_dtype=f32)
        return layers.constrain(c_BSD, RESIDUAL_AXES)


def patch_tokens(ctx: Ctx, x_BFHWC):
    """Patch tokens [B, padded, P]: zero rows pad S up to a multiple of the devices a context axis splits the tokens
    over (`padded_length`); there are none without one."""
    x_BSP = patchify(x_BFHWC, ctx.cfg.patch_size)
    return jnp.pad(x_BSP, ((0, 0), (0, padded_length(x_BSP.shape[1]) - x_BSP.shape[1]), (0, 0)))


def padded_length(tokens: int) -> int:
    """S rounded up to a multiple of the devices the enclosing layout splits tokens over (`layers.context_shards`)."""
    return -(-tokens // layers.context_shards()) * layers.context_shards()


def build_vace_block_first(cfg, *, rngs):
    return VaceBlock(cfg, rngs=rngs, first=True)


def build_stem(cfg, *, rngs):
    return WanModel(cfg, rngs=rngs, blocks=False)


def build_before_proj(cfg, *, rngs):
    return layers.Dense(cfg.dim, cfg.dim, ("embed", "heads"), rngs=rngs, kernel_init=layers.zeros,
                        param_dtype=DTYPES[cfg.param_dtype])
