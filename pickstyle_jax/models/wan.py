"""Wan2.1 diffusion transformer with the VACE context branch (PICKSTYLE.md §2-3), as pure functions.

Dimension key: B batch, F latent frames, H latent rows, W latent columns, C latent channels (16; 96 for the VACE
context), S video tokens = F/p_t * H/p_h * W/p_w, D model width, L text tokens (text_len after padding),
N heads, K head dim (D / N), J VACE blocks.

Parameters are nested dicts named after the official Wan/VACE keys (`blocks.3.self_attn.q.kernel` is
params["blocks"]["3"]["self_attn"]["q"]["kernel"]); Dense kernels are [in, out], the patch embeddings are Dense
layers on (p_t, p_h, p_w, c)-ordered patch vectors.

Block equations (m = modulation + e0, chunks 0..5 = shift/scale/gate for attention, then for the FFN):
    x += m2 * SelfAttn(LN(x) * (1 + m1) + m0)      q/k RMSNorm over all heads, 3D RoPE
    x += CrossAttn(LN_affine(x), ctx)              norm3, no modulation, no mask over the 512 text slots
    x += m5 * FFN(LN(x) * (1 + m4) + m3)
VACE: c = before_proj(PatchEmbed_vace(z)) + x0; c = vace_block_j(c); hint_j = after_proj_j(c); hint_j is added
(times context_scale[j]) to the main stream right after main block vace_layers[j].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import lora as lora_lib
from pickstyle_jax.models import layers

f32 = jnp.float32

REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "nothing_saveable": "nothing_saveable",
    "everything_saveable": "everything_saveable",
    "dots_saveable": "dots_saveable",
    "checkpoint_dots": "checkpoint_dots",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims": "checkpoint_dots_with_no_batch_dims",
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    rope_theta: float = 10000.0
    vace_layers: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 30, 35)  # () for T2V
    vace_in_dim: int = 96
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of the matmuls
    attention: str = "xla"  # layers.attention implementation: "xla" | "cudnn" | "chunked"
    attention_chunk: int = 1024  # query block of the "chunked" implementation
    attention_kv_chunk: int = 0  # > 0: also stream keys with an online softmax in "chunked"
    remat_policy: str = "none"  # per-block jax.checkpoint policy, see REMAT_POLICIES
    # The zero rows that pad the text to text_len all embed to one constant key/value. Attending to that row once
    # with a log(count) logit bias is exact and skips (text_len - L - 1) rows of text MLP, k/v projections and
    # cross-attention; ignored with cudnn attention, which takes no bias.
    fold_text_padding: bool = True

    def __post_init__(self):
        for name in ("patch_size", "vace_layers"):  # JSON round trips give lists
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.vace_layers and (self.vace_layers[0] != 0 or list(self.vace_layers) != sorted(set(self.vace_layers))
                                 or self.vace_layers[-1] >= self.num_layers):
            raise ValueError(f"vace_layers {self.vace_layers} must be increasing, start at 0 and be < num_layers")
        for name, allowed in (("param_dtype", _DTYPES), ("dtype", _DTYPES), ("remat_policy", REMAT_POLICIES),
                              ("attention", layers.ATTENTION_IMPLEMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")

    @classmethod
    def named(cls, name: str, **overrides) -> "WanConfig":
        presets = {
            "vace-14B": dict(),
            "t2v-14B": dict(vace_layers=()),
            "vace-1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, vace_layers=tuple(range(0, 30, 2))),
            "t2v-1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, vace_layers=()),
            "tiny": dict(dim=48, ffn_dim=64, text_dim=32, num_heads=2, num_layers=4, vace_layers=(0, 2)),
            "tiny-t2v": dict(dim=48, ffn_dim=64, text_dim=32, num_heads=2, num_layers=4, vace_layers=()),
        }
        if name not in presets:
            raise ValueError(f"unknown Wan config {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def replace(self, **kw) -> "WanConfig":
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_vace(self) -> bool:
        return bool(self.vace_layers)


# ------------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "xavier" | "normal" (std 0.02) | "modulation" (N(0,1)/sqrt(D)) | "zeros" | "ones"


def _dense_spec(n_in, n_out, axes, init="xavier"):
    return {"kernel": _Spec((n_in, n_out), axes, init), "bias": _Spec((n_out,), axes[1:], "zeros")}


def _block_spec(cfg: WanConfig):
    d, ff = cfg.dim, cfg.ffn_dim

    def attn():
        return {"q": _dense_spec(d, d, ("embed", "heads")), "k": _dense_spec(d, d, ("embed", "heads")),
                "v": _dense_spec(d, d, ("embed", "heads")), "o": _dense_spec(d, d, ("heads", "embed")),
                "norm_q": {"scale": _Spec((d,), ("heads",), "ones")},
                "norm_k": {"scale": _Spec((d,), ("heads",), "ones")}}

    return {
        "modulation": _Spec((1, 6, d), (None, "mod", "embed"), "modulation"),
        "self_attn": attn(),
        "norm3": {"scale": _Spec((d,), ("embed",), "ones"), "bias": _Spec((d,), ("embed",), "zeros")},
        "cross_attn": attn(),
        "ffn": {"0": _dense_spec(d, ff, ("embed", "mlp")), "2": _dense_spec(ff, d, ("mlp", "embed"))},
    }


def _param_spec(cfg: WanConfig):
    d, patch = cfg.dim, math.prod(cfg.patch_size)
    spec: dict[str, Any] = {
        "patch_embedding": _dense_spec(patch * cfg.in_dim, d, (None, "embed")),
        "text_embedding": {"0": _dense_spec(cfg.text_dim, d, (None, "embed"), "normal"),
                           "2": _dense_spec(d, d, ("embed", "heads"), "normal")},
        "time_embedding": {"0": _dense_spec(cfg.freq_dim, d, (None, "embed"), "normal"),
                           "2": _dense_spec(d, d, ("embed", "heads"), "normal")},
        "time_projection": {"1": _dense_spec(d, 6 * d, ("embed", "mod"))},
        "blocks": {str(i): _block_spec(cfg) for i in range(cfg.num_layers)},
        "head": {"head": _dense_spec(d, patch * cfg.out_dim, ("embed", None), "zeros"),
                 "modulation": _Spec((1, 2, d), (None, "mod", "embed"), "modulation")},
    }
    if cfg.has_vace:
        spec["vace_patch_embedding"] = _dense_spec(patch * cfg.vace_in_dim, d, (None, "embed"))
        spec["vace_blocks"] = {str(j): _block_spec(cfg) for j in range(len(cfg.vace_layers))}
        # D -> D projections outside attention: output axis named like an attention projection's.
        spec["vace_blocks"]["0"]["before_proj"] = _dense_spec(d, d, ("embed", "heads"), "zeros")
        for j in range(len(cfg.vace_layers)):
            spec["vace_blocks"][str(j)]["after_proj"] = _dense_spec(d, d, ("heads", "embed"), "zeros")
    return spec


def _is_spec(x):
    return isinstance(x, _Spec)


def param_axes(cfg: WanConfig):
    """Same tree as the params, leaves = tuples of logical axis names (None = replicated)."""
    return jax.tree_util.tree_map(lambda s: s.axes, _param_spec(cfg), is_leaf=_is_spec)


def param_shapes(cfg: WanConfig):
    """Same tree as the params, leaves = jax.ShapeDtypeStruct."""
    dtype = _DTYPES[cfg.param_dtype]
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), _param_spec(cfg), is_leaf=_is_spec)


def init(cfg: WanConfig, rng):
    """Official-style random init (xavier Dense, N(0, 0.02) embeddings, zero head/VACE projections); jit-able."""
    dtype = _DTYPES[cfg.param_dtype]
    leaves, treedef = jax.tree_util.tree_flatten(_param_spec(cfg), is_leaf=_is_spec)
    values = []
    for spec, key in zip(leaves, jax.random.split(rng, len(leaves))):
        if spec.init == "xavier":
            bound = math.sqrt(6.0 / (spec.shape[0] + spec.shape[1]))
            v = jax.random.uniform(key, spec.shape, f32, -bound, bound)
        elif spec.init == "normal":
            v = 0.02 * jax.random.normal(key, spec.shape, f32)
        elif spec.init == "modulation":
            v = jax.random.normal(key, spec.shape, f32) / math.sqrt(cfg.dim)
        elif spec.init == "ones":
            v = jnp.ones(spec.shape, f32)
        else:
            v = jnp.zeros(spec.shape, f32)
        values.append(v.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


# ------------------------------------------------------------------------------------------------- forward


def _sub(tree, *keys):
    """tree[k0][k1]..., or None where a key is absent (LoRA trees only cover adapted layers)."""
    for key in keys:
        if tree is None or key not in tree:
            return None
        tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Per-call constants threaded through the blocks."""
    cfg: WanConfig
    dtype: Any
    lora_scale: float


def _linear(ctx: _Ctx, x, p, lp, out_dtype=None):
    if lp is None:
        return layers.dense(x, p, dtype=ctx.dtype, out_dtype=out_dtype)
    return lora_lib.dense(x, p, lp, ctx.lora_scale, dtype=ctx.dtype, out_dtype=out_dtype)


def _self_attn(ctx: _Ctx, p, lp, y_BSD, rope):
    cfg = ctx.cfg
    b, s, _ = y_BSD.shape
    heads = (b, s, cfg.num_heads, cfg.head_dim)
    q_BSD = layers.rms_norm(_linear(ctx, y_BSD, p["q"], _sub(lp, "q"), f32), p["norm_q"], eps=cfg.eps)
    k_BSD = layers.rms_norm(_linear(ctx, y_BSD, p["k"], _sub(lp, "k"), f32), p["norm_k"], eps=cfg.eps)
    v_BSNK = _linear(ctx, y_BSD, p["v"], _sub(lp, "v")).reshape(heads)
    # 1/sqrt(K) is folded into q while it is still fp32
    q_BSNK = (layers.apply_rope(q_BSD.reshape(heads), *rope) * cfg.head_dim**-0.5).astype(ctx.dtype)
    k_BSNK = layers.apply_rope(k_BSD.reshape(heads), *rope).astype(ctx.dtype)
    out_BSNK = layers.attention(q_BSNK, k_BSNK, v_BSNK, implementation=cfg.attention, scale=1.0,
                                chunk_size=cfg.attention_chunk, kv_chunk_size=cfg.attention_kv_chunk or None)
    return _linear(ctx, out_BSNK.reshape(b, s, cfg.dim), p["o"], _sub(lp, "o"), f32)


def _cross_attn(ctx: _Ctx, p, lp, y_BSD, text_BLD, text_bias_L):
    cfg = ctx.cfg
    b, s, _ = y_BSD.shape
    q_BSD = layers.rms_norm(_linear(ctx, y_BSD, p["q"], _sub(lp, "q"), f32), p["norm_q"], eps=cfg.eps)
    q_BSD = q_BSD * cfg.head_dim**-0.5
    k_BLD = layers.rms_norm(_linear(ctx, text_BLD, p["k"], _sub(lp, "k"), f32), p["norm_k"], eps=cfg.eps)
    v_BLD = _linear(ctx, text_BLD, p["v"], _sub(lp, "v"))
    split = lambda a: a.reshape(b, a.shape[1], cfg.num_heads, cfg.head_dim).astype(ctx.dtype)
    # 512 text keys: the plain path is cheap; the chunked one only matters for the S x S self-attention.
    impl = "xla" if cfg.attention == "chunked" else cfg.attention
    out_BSNK = layers.attention(split(q_BSD), split(k_BLD), split(v_BLD), implementation=impl, scale=1.0,
                                key_bias=text_bias_L)
    return _linear(ctx, out_BSNK.reshape(b, s, cfg.dim), p["o"], _sub(lp, "o"), f32)


def _block(ctx: _Ctx, p, lp, x_BSD, e0_B6D, text_BLD, text_bias_L, rope):
    """One Wan attention block on the fp32 residual stream x."""
    cfg = ctx.cfg
    m_B6D = p["modulation"].astype(f32) + e0_B6D
    shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (m_B6D[:, k, None, :] for k in range(6))

    y_BSD = layers.layer_norm(x_BSD, eps=cfg.eps) * (1 + scale_msa) + shift_msa
    x_BSD = x_BSD + gate_msa * _self_attn(ctx, p["self_attn"], _sub(lp, "self_attn"), y_BSD, rope)

    y_BSD = layers.layer_norm(x_BSD, p["norm3"], eps=cfg.eps)
    x_BSD = x_BSD + _cross_attn(ctx, p["cross_attn"], _sub(lp, "cross_attn"), y_BSD, text_BLD, text_bias_L)

    y_BSD = layers.layer_norm(x_BSD, eps=cfg.eps) * (1 + scale_ffn) + shift_ffn
    h_BSF = layers.gelu_tanh(_linear(ctx, y_BSD, p["ffn"]["0"], _sub(lp, "ffn", "0")))
    return x_BSD + gate_ffn * _linear(ctx, h_BSF, p["ffn"]["2"], _sub(lp, "ffn", "2"), f32)


def _vace_block(ctx: _Ctx, j, p, lp, c_BSD, x0_BSD, e0_B6D, text_BLD, text_bias_L, rope):
    """VACE block j: returns (hint_j, c) with hint_j = after_proj(c)."""
    if j == 0:
        c_BSD = _linear(ctx, c_BSD, p["before_proj"], _sub(lp, "before_proj"), f32) + x0_BSD
    c_BSD = _block(ctx, p, lp, c_BSD, e0_B6D, text_BLD, text_bias_L, rope)
    return _linear(ctx, c_BSD, p["after_proj"], _sub(lp, "after_proj"), f32), c_BSD


def _remat(cfg: WanConfig, fn):
    policy = REMAT_POLICIES[cfg.remat_policy]
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


def _patchify(x_BFHWC, patch_size):
    """[B, F, H, W, C] -> [B, S, p_t*p_h*p_w*C], tokens frame-major, patch features ordered (p_t, p_h, p_w, c)."""
    b, f, h, w, c = x_BFHWC.shape
    pt, ph, pw = patch_size
    x = x_BFHWC.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def _unpatchify(y_BSP, grid, patch_size):
    b = y_BSP.shape[0]
    (gf, gh, gw), (pt, ph, pw) = grid, patch_size
    y = y_BSP.reshape(b, gf, gh, gw, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, gf * pt, gh * ph, gw * pw, -1)


def fold_text(cfg: WanConfig, text_BLC, text_lens=None):
    """The text rows the model embeds and their logit bias: (rows [B, L', text_dim], bias [B, L'] fp32 or None).

    The reference zero-pads every prompt to text_len rows and attends to all of them. Zero rows all embed to one
    constant key/value, so attending to m of them equals attending to one with logit bias log(m). With
    fold_text_padding (not with cudnn, which takes no bias) the rows kept are the given L plus one zero row;
    sample b's rows at or beyond text_lens[b] are masked (-inf) and its zero row carries log(text_len -
    text_lens[b]) (-inf when nothing is padded). Without it, the text is zero-padded to text_len rows.
    """
    b, n, _ = text_BLC.shape
    if text_lens is not None:
        lens_B = jnp.asarray(text_lens, jnp.int32).reshape(b)
        text_BLC = jnp.where((jnp.arange(n)[None, :] < lens_B[:, None])[..., None], text_BLC, 0)
    elif cfg.text_len - n <= 1:
        return jnp.pad(text_BLC, ((0, 0), (0, cfg.text_len - n), (0, 0))), None
    if not cfg.fold_text_padding or cfg.attention == "cudnn":
        return jnp.pad(text_BLC, ((0, 0), (0, cfg.text_len - n), (0, 0))), None
    if text_lens is None:
        lens_B = jnp.full((b,), n, jnp.int32)
    valid_BL = jnp.arange(n)[None, :] < lens_B[:, None]
    n_pad_B = (cfg.text_len - lens_B).astype(f32)
    pad_bias_B1 = jnp.where(n_pad_B > 0, jnp.log(jnp.maximum(n_pad_B, 1.0)), -jnp.inf)[:, None]
    bias_BL = jnp.concatenate([jnp.where(valid_BL, 0.0, -jnp.inf).astype(f32), pad_bias_B1], axis=1)
    return jnp.pad(text_BLC, ((0, 0), (0, 1), (0, 0))), bias_BL


def _check_inputs(cfg: WanConfig, x, t, text, vace_context, context_scale, text_lens=None):
    if x.ndim != 5 or x.shape[-1] != cfg.in_dim:
        raise ValueError(f"x must be [B, F, H, W, {cfg.in_dim}] channels-last latents, got shape {x.shape}")
    b, f, h, w, _ = x.shape
    if any(n % p for n, p in zip((f, h, w), cfg.patch_size)):
        raise ValueError(f"latent (F, H, W) = {(f, h, w)} must be divisible by the patch size {cfg.patch_size}")
    if np.shape(t) not in ((b,), ()):
        raise ValueError(f"t must have shape [B] = [{b}] (or be a scalar), got {np.shape(t)}")
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
        raise ValueError(f"text must be [B={b}, L, {cfg.text_dim}], got shape {text.shape}")
    if text.shape[1] > cfg.text_len:
        raise ValueError(f"text length {text.shape[1]} exceeds text_len {cfg.text_len}")
    if text_lens is not None and np.shape(text_lens) != (b,):
        raise ValueError(f"text_lens must have shape [B] = [{b}], got {np.shape(text_lens)}")
    if cfg.has_vace:
        want = (b, f, h, w, cfg.vace_in_dim)
        if vace_context is None:
            raise ValueError(f"this VACE model needs vace_context of shape {want}")
        if tuple(vace_context.shape) != want:
            raise ValueError(f"vace_context must have shape {want} (x's B, F, H, W), got {vace_context.shape}")
        if np.ndim(context_scale) > 1 or np.size(context_scale) not in (1, len(cfg.vace_layers)):
            raise ValueError(f"context_scale must be a scalar or have {len(cfg.vace_layers)} entries, "
                             f"got shape {np.shape(context_scale)}")
    elif vace_context is not None:
        raise ValueError("vace_context given but this config has no VACE layers (vace_layers=())")


def forward(cfg: WanConfig, params, x, t, text, vace_context=None, *, lora=None, context_scale=1.0,
            text_lens=None):
    """Flow velocity of the Wan DiT (+ VACE) at latents x and timesteps t.

    x [B, F, H, W, in_dim] latents; t [B] in [0, 1000]; text [B, L, text_dim] with L <= text_len (zero-padded to
    text_len here, never masked); vace_context [B, F, H, W, vace_in_dim] (required iff cfg has VACE layers);
    lora: an optional lora.Lora applied unmerged; context_scale: scalar or [J] hint scales.
    text_lens: optional int [B], the true prompt lengths; rows at or beyond text_lens[b] are zeroed, and with
    fold_text_padding every sample's (text_len - text_lens[b]) zero rows fold into one key with a log(count)
    bias, exactly, even when the prompts of one batch differ in length.
    Returns the velocity [B, F, H, W, out_dim] in fp32.
    """
    _check_inputs(cfg, x, t, text, vace_context, context_scale, text_lens)
    b, f, h, w, _ = x.shape
    grid = (f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    ctx = _Ctx(cfg, _DTYPES[cfg.dtype], 1.0 if lora is None else lora.config.scale)
    lp = None
    if lora is not None:
        lp = lora.params
        unknown = [path for path in lora_lib.adapter_paths(lora)
                   if "kernel" not in (_sub(params, *path.split(".")) or {})]
        if unknown:
            raise ValueError(f"LoRA adapters without a matching Dense layer in the model: {unknown}")
    fp32_ctx = dataclasses.replace(ctx, dtype=f32)
    rope = layers.rope_freqs(cfg.head_dim, grid, theta=cfg.rope_theta)

    x0_BSD = _linear(ctx, _patchify(x, cfg.patch_size), params["patch_embedding"], _sub(lp, "patch_embedding"), f32)

    # time conditioning, fp32 throughout
    sinusoid_BT = layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(t, f32), (b,)), cfg.freq_dim)
    te, tp = params["time_embedding"], params["time_projection"]
    e_BD = _linear(fp32_ctx, jax.nn.silu(_linear(fp32_ctx, sinusoid_BT, te["0"], _sub(lp, "time_embedding", "0"))),
                   te["2"], _sub(lp, "time_embedding", "2"))
    e0_B6D = _linear(fp32_ctx, jax.nn.silu(e_BD), tp["1"], _sub(lp, "time_projection", "1")).reshape(b, 6, cfg.dim)

    # text: always text_len rows, zero-padded and never masked (the padded rows are attended to); with
    # fold_text_padding the (text_len - L) identical padded rows are one row with a log(count) logit bias
    text_BLC, text_bias_L = fold_text(cfg, text, text_lens)
    tx = params["text_embedding"]
    text_BLD = layers.gelu_tanh(_linear(ctx, text_BLC, tx["0"], _sub(lp, "text_embedding", "0")))
    text_BLD = _linear(ctx, text_BLD, tx["2"], _sub(lp, "text_embedding", "2"))

    # VACE block j depends only on x0 and block j-1, so it runs just before its hint is added after main block
    # vace_layers[j]: one hint is alive at a time instead of all J.
    if cfg.has_vace:
        scales_J = jnp.broadcast_to(jnp.asarray(context_scale, f32).reshape(-1), (len(cfg.vace_layers),))
        c_BSD = _linear(ctx, _patchify(vace_context, cfg.patch_size), params["vace_patch_embedding"],
                        _sub(lp, "vace_patch_embedding"), f32)
    block = _remat(cfg, lambda p_, lp_, x_, e0_, t_: _block(ctx, p_, lp_, x_, e0_, t_, text_bias_L, rope))
    x_BSD = x0_BSD
    for i in range(cfg.num_layers):
        x_BSD = block(params["blocks"][str(i)], _sub(lp, "blocks", str(i)), x_BSD, e0_B6D, text_BLD)
        if i in cfg.vace_layers:
            j = cfg.vace_layers.index(i)
            vace_block = _remat(cfg, lambda p_, lp_, c_, x0_, e0_, t_, j=j: _vace_block(
                ctx, j, p_, lp_, c_, x0_, e0_, t_, text_bias_L, rope))
            hint_BSD, c_BSD = vace_block(params["vace_blocks"][str(j)], _sub(lp, "vace_blocks", str(j)), c_BSD,
                                         x0_BSD, e0_B6D, text_BLD)
            x_BSD = x_BSD + scales_J[j] * hint_BSD

    # head, fp32, modulated by e (not e0)
    m_B2D = params["head"]["modulation"].astype(f32) + e_BD[:, None, :]
    shift_B1D, scale_B1D = m_B2D[:, 0, None, :], m_B2D[:, 1, None, :]
    y_BSD = layers.layer_norm(x_BSD, eps=cfg.eps) * (1 + scale_B1D) + shift_B1D
    out_BSP = _linear(fp32_ctx, y_BSD, params["head"]["head"], _sub(lp, "head", "head"), f32)
    return _unpatchify(out_BSP, grid, cfg.patch_size)
