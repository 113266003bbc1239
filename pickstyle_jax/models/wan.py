"""Wan2.1 diffusion transformer with the VACE context branch (PICKSTYLE.md §2-3), as Flax NNX modules.

Dimension key: B batch, F latent frames, H latent rows, W latent columns, C latent channels (16; 96 for the VACE
context), S video tokens = F/p_t * H/p_h * W/p_w, D model width, L text tokens (text_len after padding),
N heads, K head dim (D / N), J VACE blocks, P main blocks per VACE super-block.

The modules' attribute names are the official Wan/VACE keys, so their state, as a plain nested dict, is the
checkpoint layout: `blocks.3.self_attn.q.kernel` is params["blocks"]["3"]["self_attn"]["q"]["kernel"]. Dense
kernels are [in, out]; the patch embeddings are Dense layers on (p_t, p_h, p_w, c)-ordered patch vectors. Outside
jit a model is only that dict; `forward` merges it with the cached graph definition inside the caller's trace.

Block equations (m = modulation + e0, chunks 0..5 = shift/scale/gate for attention, then for the FFN):
    x += m2 * SelfAttn(LN(x) * (1 + m1) + m0)      q/k RMSNorm over all heads, 3D RoPE
    x += CrossAttn(LN_affine(x), ctx)              norm3, no modulation, no mask over the 512 text slots
    x += m5 * FFN(LN(x) * (1 + m4) + m3)
VACE: c = before_proj(PatchEmbed_vace(z)) + x0; c = vace_block_j(c); hint_j = after_proj_j(c); hint_j is added
(times context_scale[j]) to the main stream right after main block vace_layers[j].

Architecture vs run-time options. `WanConfig` holds only what fixes the parameters (sizes, heads, layers, VACE
layers, rope theta, eps, param_dtype: the dtype the weights are created and stored in); it is what a checkpoint's
config.json saves. How a forward computes is an `Options` value (models/wan_options.py, exported here as
`wan.Options`): compute dtype, attention kernel and its blocks, remat policy, the text-padding fold, and the layout
loaders produce (scan_layers). It is never saved; `Options.default(backend)` gives per-backend defaults, and
`forward(..., options=None)` uses them.

Scanned layers. The flat tree compiles every block on its own, forward and backward; the stacked tree runs them
under `lax.scan`, so one block is traced and compiled, and remat is realised per block (XLA cannot merge the
buffers of scanned iterations). `forward` reads the layout from the tree it is given (`is_stacked`): a stacked tree
always runs scanned, a flat one unrolled. Stacked layout:
    params["blocks"]            every main-block leaf stacked: [num_layers, ...]   (blocks.i -> index i)
    params["vace_blocks"]       every VACE-block leaf stacked: [J, ...], after_proj included
    params["vace_before_proj"]  {kernel, bias} of vace_blocks.0.before_proj (only block 0 has one: hoisted)
    everything else             as in the flat tree
`stack_layers` / `unstack_layers` convert exactly; a LoRA tree is stacked the same way inside `forward` (layers
without an adapter get zero A and B, which add exactly nothing). The stacked axes get the logical axis name
"layers" (replicated unless the sharding rules say otherwise). The scan runs over VACE super-blocks: main block
vace_layers[j], VACE block j and its hint, then the main blocks up to vace_layers[j + 1] (an inner scan), which
needs vace_layers = (0, P, 2P, ...) with num_layers = J * P (true of every real variant); T2V is one scan over
the blocks. Checkpoints are always flat on disk (`checkpoints.load_dit(path, scan_layers=True)` stacks on load),
and `init` always returns the flat tree (the converters' and LoRA's layout); stack it to run scanned.

The modules and the plain tree and array code live beside this file and are importable from here:
models/wan_modules.py (`Attention`, `WanBlock`, `VaceBlock`, `Head`, `WanModel` and the per-call context they
read), models/wan_stacking.py (the flat <-> stacked conversions, `scan_period`, `is_stacked`), models/wan_inputs.py
(patch tokens, `fold_text`, input checks) and models/wan_options.py (`Options`, `REMAT_POLICIES`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from pickstyle_jax import lora as lora_lib
from pickstyle_jax import sharding
from pickstyle_jax.models import layers
from pickstyle_jax.models.wan_inputs import check_inputs, check_latents, fold_text, unpatchify
from pickstyle_jax.models.wan_modules import (DTYPES, Attention, Ctx, Head, VaceBlock, WanBlock, WanModel,
                                              build_before_proj, build_stem, build_vace_block_first, lora_dense,
                                              padded_length, subtree)
from pickstyle_jax.models.wan_options import REMAT_POLICIES, Options
from pickstyle_jax.models.wan_stacking import (STACKED_AXIS, STACKED_KEYS, is_stacked, leaf_paths, scan_period,
                                               stack_layers, stack_lora, stack_tree, unstack_layers)

__all__ = ["REMAT_POLICIES", "STACKED_AXIS", "WanConfig", "Options", "scan_period", "Attention", "WanBlock",
           "VaceBlock", "Head", "WanModel", "init", "param_axes", "param_shapes", "stack_layers", "unstack_layers",
           "stack_lora", "is_stacked", "fold_text", "forward", "Prepared", "Embedded", "prepare", "embed_context",
           "embed", "run_blocks", "apply_head"]

f32 = jnp.float32



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
    param_dtype: str = "float32"  # the dtype the weights are created and stored in

    def __post_init__(self):
        for name in ("patch_size", "vace_layers"):  # JSON round trips give lists
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.vace_layers and (self.vace_layers[0] != 0 or list(self.vace_layers) != sorted(set(self.vace_layers))
                                 or self.vace_layers[-1] >= self.num_layers):
            raise ValueError(f"vace_layers {self.vace_layers} must be increasing, start at 0 and be < num_layers")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}")

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


def init(cfg: WanConfig, rng):
    """Official-style random init (xavier Dense, N(0, 0.02) embeddings, zero head/VACE projections); jit-able.

    Always the flat tree with the official paths (what checkpoints, converters and `lora.init` use); for scanned
    layers pass it through `stack_layers` (inside the same jit to avoid holding both)."""
    return layers.init_params(WanModel, cfg, rng)


def _heads(cfg: WanConfig) -> sharding.Units:
    return sharding.Units("heads", cfg.num_heads, "num_heads")


def param_axes(cfg: WanConfig, *, stacked: bool = False):
    """Logical axis names of every leaf of the flat tree, or of the stacked one (whose stacked leaves lead with
    "layers"). "heads" is a `sharding.Units` of cfg.num_heads: the rules split it only over mesh axes that divide
    num_heads."""
    axes = layers.logical_axes(WanModel, cfg, units=(_heads(cfg),))
    return stack_tree(cfg, axes, lambda ls: (STACKED_AXIS, *ls[0])) if stacked else axes


def param_shapes(cfg: WanConfig, *, stacked: bool = False):
    """jax.ShapeDtypeStruct of every leaf of the flat tree, or of the stacked one; nothing is allocated."""
    shapes = layers.abstract_params(WanModel, cfg)
    if stacked:
        return stack_tree(cfg, shapes, lambda ls: jax.ShapeDtypeStruct((len(ls), *ls[0].shape), ls[0].dtype))
    return shapes


@functools.lru_cache(maxsize=16)
def _dense_paths(cfg: WanConfig) -> frozenset:
    """Dotted paths of every Dense layer of the flat model (LoRA adapter targets)."""
    return frozenset(".".join(p[:-1]) for p in leaf_paths(layers.abstract_params(WanModel, cfg))
                     if p[-1] == "kernel")


# ------------------------------------------------------------------------------------------------- forward


def _host_memory_kind(devices=None):
    """"pinned_host" if every device of the backend has it, else None."""
    devices = jax.local_devices() if devices is None else devices
    kinds = [{m.kind for m in d.addressable_memories()} for d in devices]
    return "pinned_host" if kinds and all("pinned_host" in k for k in kinds) else None


def _remat(remat_policy: str, fn, *, scanned: bool):
    """fn under the options' jax.checkpoint policy. Block functions tag their input "block_input"; the offload
    policy moves exactly those to pinned host memory and recomputes everything else."""
    name = REMAT_POLICIES[remat_policy]
    if name is None:
        return fn
    if name == "offload":
        if _host_memory_kind() is None:
            raise ValueError(f"remat_policy='offload' needs a 'pinned_host' memory kind, which the "
                             f"{jax.default_backend()} backend does not offer; use remat_policy='full'")
        policy = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=("block_input",),
            offload_src="device", offload_dst="pinned_host")
    else:
        policy = getattr(jax.checkpoint_policies, name)
    # under scan, XLA cannot CSE across iterations anyway; the CSE barriers would only cost
    return jax.checkpoint(fn, policy=policy, prevent_cse=not scanned)


def _block_fns(ctx: Ctx, x0_BSD, e0_B6D, *, scanned):
    """(main, vace), each remat'd as configured. Unrolled: main(p, lp, kv, x) -> x and vace(p, lp, kv, c) -> (hint,
    c) on plain per-layer dicts (kv: the block's text (k, v) or None). Scanned: main(ps, lps, kvs, i, x) and
    vace(ps, lps, kvs, i, c) on the stacked trees and a layer index, the layer taken inside the rematerialised
    function: its saved inputs are then the whole stacks, which are the same in every iteration (the scan keeps them
    once), not layer i's weights, which the scan would stack into a second copy of every block's weights."""
    cfg = ctx.cfg

    def main(p, lp, kv, x_BSD):
        x_BSD = checkpoint_name(x_BSD, "block_input")
        return layers.bind(WanBlock, cfg, p)(ctx, x_BSD, e0_B6D, lp, kv)

    def vace(p, lp, kv, c_BSD):
        c_BSD = checkpoint_name(c_BSD, "block_input")
        build = build_vace_block_first if "before_proj" in p else VaceBlock
        return layers.bind(build, cfg, p)(ctx, c_BSD, x0_BSD, e0_B6D, lp, kv)

    if scanned:
        at = lambda fn: lambda ps, lps, kvs, i, x: fn(*jax.tree.map(lambda a: a[i], (ps, lps, kvs)), x)  # noqa: E731
        main, vace = at(main), at(vace)
    policy = ctx.opts.remat_policy
    return _remat(policy, main, scanned=scanned), _remat(policy, vace, scanned=scanned)


def _run_unrolled(ctx: Ctx, params, lp, kv, x0_BSD, c_BSD, e0_B6D, scales_J):
    """VACE block j depends only on x0 and block j-1, so it runs just before its hint is added after main block
    vace_layers[j]: one hint is alive at a time instead of all J. kv: `Prepared.kv` (flat) or None."""
    cfg = ctx.cfg
    main, vace = _block_fns(ctx, x0_BSD, e0_B6D, scanned=False)
    x_BSD = x0_BSD
    for i in range(cfg.num_layers):
        x_BSD = main(params["blocks"][str(i)], subtree(lp, "blocks", str(i)), subtree(kv, "blocks", str(i)), x_BSD)
        if i in cfg.vace_layers:
            j = cfg.vace_layers.index(i)
            hint_BSD, c_BSD = vace(params["vace_blocks"][str(j)], subtree(lp, "vace_blocks", str(j)),
                                   subtree(kv, "vace_blocks", str(j)), c_BSD)
            x_BSD = x_BSD + scales_J[j] * hint_BSD
    return x_BSD


def _run_scanned(ctx: Ctx, params, lp, kv, x0_BSD, c_BSD, e0_B6D, scales_J):
    """One lax.scan over VACE super-blocks (main block j*P, VACE block j + hint, main blocks j*P+1 .. j*P+P-1 as an
    inner scan), or over all blocks for T2V. lp is the stacked LoRA tree (or None); kv the stacked `Prepared.kv`
    (or None). The scans run over layer indices; every block reads its layer from the stacks (`_block_fns`)."""
    cfg = ctx.cfg
    main, vace = _block_fns(ctx, x0_BSD, e0_B6D, scanned=True)
    p_main, l_main, k_main = params["blocks"], subtree(lp, "blocks"), subtree(kv, "blocks")

    def scan_main(x_BSD, layer_ids):
        return jax.lax.scan(lambda x, i: (main(p_main, l_main, k_main, i, x), None), x_BSD, layer_ids)[0]

    if not cfg.has_vace:
        return scan_main(x0_BSD, jnp.arange(cfg.num_layers))

    j, per = len(cfg.vace_layers), scan_period(cfg)
    p_vace, l_vace, k_vace = params["vace_blocks"], subtree(lp, "vace_blocks"), subtree(kv, "vace_blocks")

    def super_block(carry, xs):
        x_BSD, c_BSD = carry
        jj, scale = xs
        x_BSD = main(p_main, l_main, k_main, jj * per, x_BSD)
        hint_BSD, c_BSD = vace(p_vace, l_vace, k_vace, jj, c_BSD)
        x_BSD = x_BSD + scale * hint_BSD
        if per > 1:
            x_BSD = scan_main(x_BSD, jj * per + jnp.arange(1, per))
        return (x_BSD, c_BSD), None

    if ctx.opts.remat_policy == "nested":  # the scan keeps one (x, c) per super-block, not one per block
        super_block = jax.checkpoint(super_block, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    return jax.lax.scan(super_block, (x0_BSD, c_BSD), (jnp.arange(j), scales_J))[0][0]


# --------------------------------------------------------------------------------------- forward in stages
#
# forward = embed -> run_blocks -> apply_head. What depends only on the text and the VACE context (the text MLP,
# every block's cross-attention K/V, the context's patch embedding) is a `Prepared`, computed once per video by
# `prepare` and reused at every denoising step; TeaCache (sample/sampler.py) reuses run_blocks' residual.


@struct.dataclass
class Prepared:
    """A forward's per-video constants (`prepare`), with the batch axis of the forward they serve.

    kv: every block's cross-attention (k, v) of the embedded text, each [B, L', N, K] in the compute dtype (k after
        norm_k; L' = the folded text length): {"blocks": {"i": (k, v)}, "vace_blocks": {"j": (k, v)}} for flat
        params, {"blocks": (k, v), "vace_blocks": (k, v)} with a leading layer axis [num_layers | J, ...] for
        stacked ones (scanned with the weights);
    text_bias: [B, L'] fp32, the padding fold's logit bias (`fold_text`), or None;
    context: [B, S, D] fp32, the VACE context's patch embedding (before before_proj), or None (T2V, or not given:
        `embed_context` computes one; `prepared.replace(context=...)` sets it).
    They hold the text embedding, K/V and context embedding of the weights and LoRA they were prepared with."""

    kv: Any
    text_bias: Any = None
    context: Any = None


@struct.dataclass
class Embedded:
    """What `embed` gives for one step: x0 [B, S, D] fp32 patch tokens of the latents (S padded to a multiple of a
    context axis's size, if the layout has one), e [B, D] and e0 [B, 6, D]
    fp32 time embeddings (head / blocks), and the token grid (static)."""

    x0: jax.Array
    e: jax.Array
    e0: jax.Array
    grid: tuple = struct.field(pytree_node=False, default=())


def _setup(cfg: WanConfig, opts: Options, stacked: bool, lora, grid=None):
    """(ctx, lp): the per-call context (RoPE tables for `grid`, if given) and the LoRA tree in the params' layout."""
    lp = None
    if lora is not None:
        unknown = [path for path in lora_lib.adapter_paths(lora) if path not in _dense_paths(cfg)]
        if unknown:
            raise ValueError(f"LoRA adapters without a matching Dense layer in the model: {unknown}")
        lp = stack_lora(cfg, lora.params) if stacked else lora.params
    ctx = Ctx(cfg, opts, DTYPES[opts.dtype], 1.0 if lora is None else lora.config.scale)
    if grid is not None:
        # a context axis of c devices splits the S tokens: they are padded to a multiple of c
        # (`wan_modules.patch_tokens`, the RoPE tables here), the padded keys are masked in self-attention (everything
        # else is per token) and the padded rows are dropped before the head
        tokens = math.prod(grid)
        padded = padded_length(tokens)
        rope = tuple(jnp.pad(a, ((0, 0), (0, padded - tokens), (0, 0), (0, 0)))
                     for a in layers.rope_tables(cfg.head_dim, grid, theta=cfg.rope_theta))
        ctx = dataclasses.replace(ctx, rope=rope, tokens=tokens, padded=padded)
    return ctx, lp


def _stem_of(cfg: WanConfig, params):
    return layers.bind(build_stem, cfg, {k: v for k, v in params.items() if k not in STACKED_KEYS})


def _grid(cfg: WanConfig, x):
    _, f, h, w, _ = x.shape
    return (f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])


def _scales(cfg: WanConfig, context_scale):
    if not cfg.has_vace:
        return None
    return jnp.broadcast_to(jnp.asarray(context_scale, f32).reshape(-1), (len(cfg.vace_layers),))


def _text_kv(ctx: Ctx, params, lp, stacked: bool, text_BLD):
    """`Prepared.kv`: every block's cross-attention (k, v) of text_BLD, in the params' layout (stacked: one
    lax.map over the layer axis, the same per-layer computation as inside the scanned blocks)."""
    kv_of = lambda p, l: layers.bind(Attention, ctx.cfg, p["cross_attn"]).text_kv(ctx, text_BLD,
                                                                                   subtree(l, "cross_attn"))
    out = {}
    for name in ("blocks", "vace_blocks") if ctx.cfg.has_vace else ("blocks",):
        if stacked:
            out[name] = jax.lax.map(lambda pl: kv_of(*pl), (params[name], subtree(lp, name)))
        else:
            out[name] = {i: kv_of(p, subtree(lp, name, i)) for i, p in params[name].items()}
    return out


def _run_blocks(ctx: Ctx, stacked: bool, params, lp, kv, x0_BSD, c_BSD, e0_B6D, scales_J):
    """The block stack (main + VACE) on patch tokens x0: the residual stream x before the head [B, S, D] fp32. c is
    the VACE context's patch embedding (before before_proj)."""
    if stacked:
        if ctx.cfg.has_vace:  # VACE block 0's input projection, hoisted out of the scan
            before = layers.bind(build_before_proj, ctx.cfg, params["vace_before_proj"])
            c_BSD = lora_dense(ctx, before, c_BSD, lp, "vace_before_proj", out_dtype=f32) + x0_BSD
        return _run_scanned(ctx, params, lp, kv, x0_BSD, c_BSD, e0_B6D, scales_J)
    return _run_unrolled(ctx, params, lp, kv, x0_BSD, c_BSD, e0_B6D, scales_J)


def _layout(cfg: WanConfig, *arrays):
    return layers.layout(arrays, units=(_heads(cfg),))


def _check_prepared(cfg: WanConfig, stacked: bool, b: int, s: int, prepared: Prepared):
    if not isinstance(prepared, Prepared):
        raise ValueError(f"prepared must be a wan.Prepared (from wan.prepare), got {type(prepared).__name__}")
    k = jax.tree.leaves(prepared.kv)[0]
    if isinstance(prepared.kv["blocks"], dict) == stacked:
        raise ValueError(f"prepared was made for {'flat' if stacked else 'stacked'} params, these are "
                         f"{'stacked' if stacked else 'flat'}: prepare with the params the forward runs")
    if k.shape[-4] != b:
        raise ValueError(f"prepared has batch {k.shape[-4]}, x has {b}: prepare the text of every sample")
    if cfg.has_vace and (prepared.context is None or tuple(prepared.context.shape) != (b, s, cfg.dim)):
        raise ValueError(f"this VACE model needs prepared.context of shape {(b, s, cfg.dim)} (wan.embed_context of "
                         f"the vace_context), got {None if prepared.context is None else prepared.context.shape}")


def prepare(cfg: WanConfig, params, text, vace_context=None, *, lora=None, text_lens=None,
            options: Options | None = None) -> Prepared:
    """The per-video constants of `forward(..., prepared=)`: the folded text's bias, every block's cross-attention
    K/V of the embedded text and (if vace_context is given) the context's patch embedding. Arguments as in
    `forward`; lora and options must be the ones the forward runs with (a LoRA on text_embedding, cross_attn.k/v
    or vace_patch_embedding changes these constants), params in the same layout (flat or stacked)."""
    b = text.shape[0] if getattr(text, "ndim", 0) == 3 else None
    if b is None or text.shape[2] != cfg.text_dim or text.shape[1] > cfg.text_len:
        raise ValueError(f"text must be [B, L <= {cfg.text_len}, {cfg.text_dim}], got shape {np.shape(text)}")
    if text_lens is not None and np.shape(text_lens) != (b,):
        raise ValueError(f"text_lens must have shape [B] = [{b}], got {np.shape(text_lens)}")
    stacked = is_stacked(cfg, params)
    options = Options.default() if options is None else options
    context = None if vace_context is None else embed_context(cfg, params, vace_context, lora=lora, options=options)
    with _layout(cfg, params, lora, text):
        ctx, lp = _setup(cfg, options, stacked, lora)
        text_BLC, text_bias = fold_text(cfg, text, text_lens, fold=options.fold_text_padding)
        text_BLD = _stem_of(cfg, params).embed_text(ctx, text_BLC, lp)
        return Prepared(kv=_text_kv(ctx, params, lp, stacked, text_BLD), text_bias=text_bias, context=context)


def embed_context(cfg: WanConfig, params, vace_context, *, lora=None, options: Options | None = None):
    """The VACE context's patch embedding [B, S, D] fp32 (`Prepared.context`; before vace_blocks.0.before_proj).
    vace_context [B, F, H, W, vace_in_dim]."""
    if not cfg.has_vace:
        raise ValueError("vace_context given but this config has no VACE layers (vace_layers=())")
    if vace_context.ndim != 5 or vace_context.shape[-1] != cfg.vace_in_dim or any(
            n % p for n, p in zip(vace_context.shape[1:4], cfg.patch_size)):
        raise ValueError(f"vace_context must be [B, F, H, W, {cfg.vace_in_dim}] with (F, H, W) divisible by the "
                         f"patch size {cfg.patch_size}, got {vace_context.shape}")
    options = Options.default() if options is None else options
    with _layout(cfg, params, lora, vace_context):
        ctx, lp = _setup(cfg, options, is_stacked(cfg, params), lora)
        return _stem_of(cfg, params).embed_context(ctx, vace_context, lp)


def embed(cfg: WanConfig, params, x, t, *, lora=None, options: Options | None = None) -> Embedded:
    """The per-step input stage: latents x [B, F, H, W, in_dim] at times t [B] -> `Embedded` (x0, e, e0)."""
    check_latents(cfg, x, t)
    options = Options.default() if options is None else options
    with _layout(cfg, params, lora, x):
        ctx, lp = _setup(cfg, options, is_stacked(cfg, params), lora)
        x0_BSD, e_BD, e0_B6D = _stem_of(cfg, params).embed_latents(ctx, x, t, lp)
        return Embedded(x0=x0_BSD, e=e_BD, e0=e0_B6D, grid=_grid(cfg, x))


def run_blocks(cfg: WanConfig, params, embedded: Embedded, prepared: Prepared, *, lora=None, context_scale=1.0,
               options: Options | None = None):
    """The block stack (main + VACE, hints added) on embedded.x0: the residual stream before the head, [B, S, D]
    fp32. TeaCache caches run_blocks(...) - embedded.x0."""
    stacked = is_stacked(cfg, params)
    b, s, _ = embedded.x0.shape
    _check_prepared(cfg, stacked, b, s, prepared)
    if cfg.has_vace and (np.ndim(context_scale) > 1 or np.size(context_scale) not in (1, len(cfg.vace_layers))):
        raise ValueError(f"context_scale must be a scalar or have {len(cfg.vace_layers)} entries, "
                         f"got shape {np.shape(context_scale)}")
    options = Options.default() if options is None else options
    with _layout(cfg, params, lora, embedded.x0):
        ctx, lp = _setup(cfg, options, stacked, lora, embedded.grid)
        ctx = dataclasses.replace(ctx, text_bias=prepared.text_bias)
        return _run_blocks(ctx, stacked, params, lp, prepared.kv, embedded.x0, prepared.context, embedded.e0,
                           _scales(cfg, context_scale))


def apply_head(cfg: WanConfig, params, x_BSD, embedded: Embedded, *, lora=None, options: Options | None = None):
    """The output stage: the residual stream x [B, S, D] through the head, modulated by embedded.e (this step's
    time), unpatchified to the velocity [B, F, H, W, out_dim] fp32."""
    options = Options.default() if options is None else options
    with _layout(cfg, params, lora, x_BSD):
        ctx, lp = _setup(cfg, options, is_stacked(cfg, params), lora)
        # the rows a context axis padded the tokens with (`wan_modules.patch_tokens`) end here
        out = _stem_of(cfg, params).head(ctx, x_BSD[:, :math.prod(embedded.grid)], embedded.e, subtree(lp, "head"))
        return unpatchify(out, embedded.grid, cfg.patch_size)


def forward(cfg: WanConfig, params, x, t, text=None, vace_context=None, *, lora=None, context_scale=1.0,
            text_lens=None, options: Options | None = None, prepared: Prepared | None = None):
    """Flow velocity of the Wan DiT (+ VACE) at latents x and timesteps t.

    params: the flat tree (blocks run unrolled) or the stacked one (`stack_layers`; blocks run under lax.scan): the
    layout is read from the tree, never from `options`.
    x [B, F, H, W, in_dim] latents; t [B] in [0, 1000]; text [B, L, text_dim] with L <= text_len (zero-padded to
    text_len here, never masked); vace_context [B, F, H, W, vace_in_dim] (required iff cfg has VACE layers);
    lora: an optional lora.Lora (flat, official paths) applied unmerged; context_scale: scalar or [J] hint scales.
    text_lens: optional int [B], the true prompt lengths; rows at or beyond text_lens[b] are zeroed, and with
    fold_text_padding every sample's (text_len - text_lens[b]) zero rows fold into one key with a log(count)
    bias, exactly, even when the prompts of one batch differ in length.
    options: the run-time `Options` (compute dtype, attention kernel and blocks, remat, text fold); None means
    `Options.default()` for the current backend.
    prepared: a `Prepared` from `prepare` (text, text_lens and vace_context are then taken from it and must be
    None): embed -> run_blocks -> apply_head with the per-video constants precomputed, the same numbers.
    Returns the velocity [B, F, H, W, out_dim] in fp32.

    Sharded params and inputs need nothing more than a plain `jax.jit`: the forward pins its own layout on the mesh
    they live on (`layers.layout`), so its value and gradients equal the one-device ones under any sharding.
    """
    options = Options.default() if options is None else options
    if prepared is not None:
        if text is not None or vace_context is not None or text_lens is not None:
            raise ValueError("pass either prepared or text / text_lens / vace_context, not both")
        emb = embed(cfg, params, x, t, lora=lora, options=options)
        x_BSD = run_blocks(cfg, params, emb, prepared, lora=lora, context_scale=context_scale, options=options)
        return apply_head(cfg, params, x_BSD, emb, lora=lora, options=options)
    if text is None:
        raise ValueError("forward needs text (or prepared, from wan.prepare)")
    check_inputs(cfg, x, t, text, vace_context, context_scale, text_lens)
    stacked = is_stacked(cfg, params)
    with _layout(cfg, params, lora, x, vace_context):
        return _forward(cfg, options, stacked, params, x, t, text, vace_context, lora, context_scale, text_lens)


def _forward(cfg: WanConfig, opts: Options, stacked: bool, params, x, t, text, vace_context, lora, context_scale,
             text_lens):
    grid = _grid(cfg, x)
    ctx, lp = _setup(cfg, opts, stacked, lora, grid)
    stem = _stem_of(cfg, params)
    # text: with fold_text_padding the (text_len - L) identical padded rows are one row with a log(count) bias
    text_BLC, text_bias = fold_text(cfg, text, text_lens, fold=opts.fold_text_padding)
    x0_BSD, c_BSD, e_BD, e0_B6D, text_BLD = stem.embed(ctx, x, t, text_BLC, vace_context, lp)
    ctx = dataclasses.replace(ctx, text_BLD=text_BLD, text_bias=text_bias)
    x_BSD = _run_blocks(ctx, stacked, params, lp, None, x0_BSD, c_BSD, e0_B6D, _scales(cfg, context_scale))
    return unpatchify(stem.head(ctx, x_BSD[:, :ctx.tokens], e_BD, subtree(lp, "head")), grid, cfg.patch_size)
