"""Wan2.1 causal 3D VAE (PICKSTYLE.md §4): video [B,F,H,W,3] in [-1,1] <-> normalised latents [B,T,h,w,z].

Dimension key: B batch, F pixel frames, T latent (or chunk) frames, H/W pixel rows/columns, h/w latent rows/columns
(H/8, W/8), C channels. Everything is channels-last.

The model is a Flax NNX module (`WanVae`) whose attribute paths mirror the official `Wan2.1_VAE.pth` key names
(`encoder.downsamples.3.residual.2.kernel`, `decoder.upsamples.3.time_conv.bias`, ...): conv kernels are
`[kT,kH,kW,I,O]` / `[kH,kW,I,O]`, RMS-norm gammas are `scale` of shape (C,). Outside jit the parameters are a plain
nested dict (`init`, checkpoints, converters); `encode`/`decode` merge them into the module inside the jitted
function (`layers.bind`). Every parameter's logical axes are None (replicated): the VAE is small (127 M parameters,
0.5 GB in fp32) and its convolutions are activation-bound, so splitting kernels would only add gathers. On a mesh
(params or input placed on several devices) the activations are split instead: the batch over the rules' "batch"
axes, the other mesh axes over the frames' width and height (`_spatial_layout`), so every device convolves its own
tile of every frame and XLA exchanges the halo rows; the causal cache runs along time, so chunking is unchanged and
the result equals one device's (fp32: ~1e-6, tests/test_stylize_multidevice.py).

Two executions that agree to ~1e-6 relative (§4.2, §4.3):
  chunked=True (default): the official scheme. Encode runs frames [0], [1-4], [5-8], ...; decode one latent frame at a
    time. Each causal conv carries its last 2 input frames to the next chunk. Chunk 0 runs on its own (its shapes
    differ), the rest in one `lax.scan`, so live activations are those of one chunk, whatever the clip length.
  chunked=False: the whole clip in one pass; memory grows with F (81x480x832 fp32: XLA plans ~81 GiB of temporaries,
    against ~7 GiB chunked). On 2 CPU cores it is also ~10-20% slower at 17x128x128 (bench/vae.py); on accelerators
    the single pass may win for short clips.
Both are one call, `Encoder`/`Decoder(x, history, first)`: a zero history is the causal zero padding, and the
resamplers' first-chunk rules (§4.3: frame 0 passes the time down/up-sampler untouched) hold for any first-chunk
length, so the non-chunked pass is just "the whole clip as chunk 0".

This file holds the config, the parameters and those drivers (chunking, the spatial split, tiled decoding, the
input checks); the modules and their layer maths are models/vae_modules.py, re-exported here (`vae.WanVae`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pickstyle_jax import sharding
from pickstyle_jax.models import layers
from pickstyle_jax.models.vae_modules import (AttentionBlock, CausalConv, Conv, Decoder, Encoder, History, Resample,
                                              ResBlock, RmsNorm, WanVae, decoder_layers, dense_1x1, encoder_layers)

__all__ = ["WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "VaeConfig", "AttentionBlock", "CausalConv", "Conv", "Decoder",
           "Encoder", "Resample", "ResBlock", "RmsNorm", "WanVae", "check_latents", "check_video", "decode",
           "decoder_layers", "encode", "encoder_layers", "init", "num_params", "param_axes", "param_shapes"]

# Per-channel statistics of Wan2.1 latents (official `WanVAE.mean/std`; diffusers' `latents_mean/std` defaults).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: the official spelling
    dropout: float = 0.0  # inference only: kept for config fidelity, never applied
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"  # compute dtype of convs and attention; norms and softmax always run in fp32

    def __post_init__(self):
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per down stage), "
                             f"got {self.temperal_downsample}")
        if self.attn_scales:
            # The official decoder would insert attention blocks that diffusers' decoder omits; no release uses them.
            raise NotImplementedError(f"attn_scales={self.attn_scales}: attention inside the down/up stages is not "
                                      f"supported (every Wan2.1 VAE has attn_scales=())")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @classmethod
    def named(cls, name: str) -> "VaeConfig":
        variants = {
            "wan2.1": cls(),
            # Every layer kind and shortcut of wan2.1, 12x narrower, one residual block less per stage (as in
            # diffusers' own tests).
            "tiny": cls(base_dim=8, num_res_blocks=1),
        }
        if name not in variants:
            raise ValueError(f"unknown VAE config {name!r}; expected one of {sorted(variants)}")
        return variants[name]

    def replace(self, **kw) -> "VaeConfig":
        return dataclasses.replace(self, **kw)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# ---------------------------------------------------------------------------------------------------- params
def init(cfg: VaeConfig, rng) -> dict:
    """Random parameters (fan-in normal kernels, zero biases, unit gammas), float32, as a plain nested dict."""
    return layers.init_params(WanVae, cfg, rng)


def param_shapes(cfg: VaeConfig) -> dict:
    """The parameter tree as nested dicts of shape tuples (official key names, our layouts); nothing allocated."""
    return jax.tree.map(lambda s: tuple(s.shape), layers.abstract_params(WanVae, cfg))


def param_axes(cfg: VaeConfig) -> dict:
    """Same tree as `init`, leaves the logical axis names: all None (replicated, see the module docstring)."""
    return layers.logical_axes(WanVae, cfg)


# ----------------------------------------------------------------------------------------------- execution
def _spatial_layout(arrays, b: int, h: int, w: int):
    """The layout of the clip's activations [B, T, H, W, C] on the mesh that `arrays` (params and input) live on:
    the batch over the rules' "batch" mesh axes that divide `b`, then every other mesh axis over the latent width
    `w` while it divides, then the latent height `h` (the causal cache is along time, so a spatial split keeps the
    chunked scheme; XLA's partitioner exchanges the 3x3 convolutions' halo rows). Every level of the VAE is a
    multiple of the latent grid, so one spec holds at all of them. None on one device. Rules: those of an enclosing
    `sharding.axis_rules`, else DEFAULT_RULES (only "batch" is read)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        mesh = layers.mesh_of(arrays)
    if mesh is None or math.prod(mesh.shape.values()) <= 1:
        return None
    batch = sharding.batch_mesh_axes(sharding.active_rules() or sharding.DEFAULT_RULES, mesh.shape, b)
    split = {"w": [], "h": []}
    for name in mesh.axis_names:
        if name in batch or mesh.shape[name] == 1:
            continue
        for dim, size in (("w", w), ("h", h)):
            if size % (math.prod(mesh.shape[a] for a in split[dim]) * mesh.shape[name]) == 0:
                split[dim].append(name)
                break
    spec = [tuple(batch) or None, None, tuple(split["h"]) or None, tuple(split["w"]) or None, None]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _run_chunked(fn, x0, rest, layout=None):
    """fn(x, hist, first) -> y on chunk 0, then lax.scan over `rest` [n, B, t, ...] carrying the history."""
    hist = History(None, layout)
    y0 = fn(x0, hist, True)
    if rest.shape[0] == 0:
        return y0

    def step(carry, xc):
        h = History(carry, layout)
        y = fn(xc, h, False)
        return h.new, y

    _, ys = lax.scan(step, hist.new, rest)  # [n, B, t', ...]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape(ys.shape[0], -1, *ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


def _cast(params, dtype):
    """Kernels and biases to the compute dtype; norm gammas stay fp32."""
    def f(path, a):
        return a.astype(jnp.float32) if getattr(path[-1], "key", None) == "scale" else a.astype(dtype)
    return jax.tree_util.tree_map_with_path(f, params)


def _bound(cfg: VaeConfig, params) -> WanVae:
    return layers.bind(WanVae, cfg, _cast(params, jnp.dtype(cfg.dtype)))


@partial(jax.jit, static_argnames=("cfg", "chunked"))
def _encode(cfg: VaeConfig, params, video, chunked: bool):
    model = _bound(cfg, params)
    s = cfg.spatial_factor
    layout = _spatial_layout((params, video), video.shape[0], video.shape[2] // s, video.shape[3] // s)
    x = History(None, layout).pin(video.astype(jnp.dtype(cfg.dtype)))
    if chunked:
        b, f, tf = *x.shape[:2], cfg.temporal_factor  # chunks: frame 0, then 4 frames (one latent frame) each
        rest = x[:, 1:].reshape(b, (f - 1) // tf, tf, *x.shape[2:])
        h = _run_chunked(model.encoder, x[:, :1], jnp.moveaxis(rest, 1, 0), layout)
    else:
        h = model.encoder(x, History(None, layout), True)
    mu = dense_1x1(model.conv1.p, h)[..., : cfg.z_dim].astype(jnp.float32)
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(cfg.latents_std, jnp.float32)  # the official (mu - mean) * (1/std)
    return (mu - mean) * inv_std


@partial(jax.jit, static_argnames=("cfg", "chunked", "clamp"))
def _decode(cfg: VaeConfig, params, z, chunked: bool, clamp: bool = True):
    """Decoder output, float32, clamped to [-1, 1] if `clamp`."""
    model = _bound(cfg, params)
    dt = jnp.dtype(cfg.dtype)
    layout = _spatial_layout((params, z), z.shape[0], z.shape[2], z.shape[3])
    z = z.astype(jnp.float32) * jnp.asarray(cfg.latents_std, jnp.float32) + jnp.asarray(cfg.latents_mean,
                                                                                         jnp.float32)
    x = History(None, layout).pin(dense_1x1(model.conv2.p, z.astype(dt)))
    if chunked:
        out = _run_chunked(model.decoder, x[:, :1], jnp.moveaxis(x[:, 1:, None], 1, 0), layout)
    else:
        out = model.decoder(x, History(None, layout), True)
    out = out.astype(jnp.float32)
    return jnp.clip(out, -1.0, 1.0) if clamp else out


# ---------------------------------------------------------------------------------------------- public API
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_video(cfg: VaeConfig, video):
    """Validates a pixel clip and drops trailing frames beyond the last 4k+1 (with a warning). Returns the clip."""
    if video.ndim != 5:
        raise ValueError(f"video must be [B, F, H, W, 3] (channels-last), got shape {tuple(video.shape)}")
    b, f, h, w, c = video.shape
    if c != 3:
        raise ValueError(f"video must have 3 channels last ([B, F, H, W, 3]), got shape {tuple(video.shape)}"
                         + (" (channels-first input? transpose to [B, F, H, W, 3])" if video.shape[1] == 3 else ""))
    s = cfg.spatial_factor
    if h % s or w % s:
        raise ValueError(f"video height and width must be multiples of {s}, got {h}x{w} (the Wan DiT further needs "
                         f"multiples of {2 * s})")
    if f < 1:
        raise ValueError("video has no frames")
    tf = cfg.temporal_factor
    keep = 1 + (f - 1) // tf * tf
    if keep != f:
        warnings.warn(f"the VAE encodes 1 + {tf}k frames: dropping the last {f - keep} of {f} frames "
                      f"(encoding {keep}, as the official code does silently)", stacklevel=3)
        video = video[:, :keep]
    if _is_concrete(video) and video.size:
        with jax.ensure_compile_time_eval():  # a concrete clip closed over by a traced function: still eager
            lo, hi = (float(v) for v in jax.device_get((jnp.min(video), jnp.max(video))))
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            warnings.warn(f"video values span [{lo:.3g}, {hi:.3g}], outside [-1, 1]: pixels are expected in [-1, 1] "
                          f"(uint8 / 127.5 - 1)", stacklevel=3)
    return video


def check_latents(cfg: VaeConfig, z):
    if z.ndim != 5:
        raise ValueError(f"latents must be [B, T, h, w, {cfg.z_dim}] (channels-last), got shape {tuple(z.shape)}")
    if z.shape[-1] != cfg.z_dim:
        raise ValueError(f"latents must have z_dim={cfg.z_dim} channels last, got shape {tuple(z.shape)}")
    if z.shape[1] < 1:
        raise ValueError("latents have no frames")
    return z


def encode(cfg: VaeConfig, params, video, *, chunked: bool = True):
    """Pixels [B, F, H, W, 3] in [-1, 1] -> normalised posterior mean [B, 1+(F-1)//4, H/8, W/8, z_dim], float32.

    chunked: the official 1,4,4,... frame chunks in a lax.scan (memory of one chunk); False runs the clip at once.
    """
    video = check_video(cfg, video)
    return _encode(cfg, params, video, bool(chunked) and video.shape[1] > 1)  # one frame: the same program


def decode(cfg: VaeConfig, params, z, *, chunked: bool = True, tile_size: tuple[int, int] | None = None,
           tile_stride: tuple[int, int] = (192, 192), clamp: bool = True):
    """Normalised latents [B, T, h, w, z_dim] -> pixels [B, 1+4(T-1), 8h, 8w, 3] clamped to [-1, 1], float32.

    chunked: one latent frame at a time in a lax.scan (official); False decodes the clip at once.
    tile_size: (H, W) in pixels to decode in overlapping spatial tiles blended linearly (diffusers' `tiled_decode`,
      defaults 256/192 there). An approximation: seams are blended, not exact, since each tile sees only its own
      receptive field. None (default) decodes exactly.
    clamp: False returns the raw decoder output (training: a clamp would leave overshooting pixels without a
      gradient); untiled decoding only.
    """
    z = check_latents(cfg, z)
    chunked = bool(chunked) and z.shape[1] > 1
    if tile_size is None:
        return _decode(cfg, params, z, chunked, bool(clamp))
    if not clamp:
        raise ValueError("clamp=False is for untiled decoding (training); tiled decoding always clamps")
    return _decode_tiled(cfg, params, z, chunked, tile_size, tile_stride)


def _decode_tiled(cfg, params, z, chunked, tile_size, tile_stride):
    s = cfg.spatial_factor
    if any(v % s for v in (*tile_size, *tile_stride)) or any(st > ts for st, ts in zip(tile_stride, tile_size)):
        raise ValueError(f"tile_size {tile_size} and tile_stride {tile_stride} must be multiples of {s} with "
                         f"stride <= size")
    (th, tw), (sh, sw) = [(a // s, b // s) for a, b in (tile_size, tile_stride)]
    _, _, h, w, _ = z.shape
    if h <= th and w <= tw:
        return _decode(cfg, params, z, chunked)
    blend_h, blend_w = (tile_size[0] - tile_stride[0], tile_size[1] - tile_stride[1])
    rows = []
    for i in range(0, h, sh):
        row = []
        for j in range(0, w, sw):
            tile = _decode(cfg, params, z[:, :, i: i + th, j: j + tw], chunked, clamp=False)
            if rows:
                tile = _blend(rows[-1][len(row)], tile, blend_h, axis=2)
            if row:
                tile = _blend(row[-1], tile, blend_w, axis=3)
            row.append(tile)
        rows.append(row)
    out = jnp.concatenate([jnp.concatenate([t[:, :, : tile_stride[0], : tile_stride[1]] for t in row], axis=3)
                           for row in rows], axis=2)
    return jnp.clip(out[:, :, : h * s, : w * s], -1.0, 1.0)


def _blend(a, b, extent, axis):
    """Linear cross-fade of `a`'s trailing `extent` rows/columns into `b`'s leading ones (diffusers blend_v/h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    r = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    a_tail = lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head = lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = a_tail * (1 - r) + b_head * r
    return jnp.concatenate([mixed, lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def num_params(cfg: VaeConfig) -> int:
    return int(sum(np.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))))
