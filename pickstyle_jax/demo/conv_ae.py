"""A plain convolutional autoencoder with the Wan2.1 VAE's latent geometry: the demo's fast-learning stand-in.

The CPU demo must fit its own autoencoder in a few minutes. At the demo's widths the Wan VAE architecture learns
slowly (bench/demo_vae.py, 300 steps on the demo world: 16.9 dB on held-out clips, this model 20.5 dB, a PCA code of
the same size 22.5 dB), so demo/pretrain.py can fit this one instead (config.pretrain.autoencoder = "conv"). It
plugs into production code through models/autoencoders.py's protocol (this module's encode / decode /
param_shapes): its checkpoints record "codec": "pickstyle_jax.demo.conv_ae:ConvAeConfig", which
`checkpoints.load_vae` imports, so nothing outside demo/ imports this file. It keeps everything the rest of the
code relies on: pixels [B, 1 + 4k, H, W, 3] in [-1, 1] <-> normalised latents
[B, 1 + k, H/8, W/8, z_dim]; frame 0 has a latent frame of its own and each later group of 4 frames shares one, so
latent frame t depends on pixel frames of its group only (no cross-group mixing, hence no chunk seams); per-channel
`latents_mean/std` as in VaeConfig. It is not a Wan checkpoint: released weights always use models/vae.py.

Per frame: conv3x3 (3 -> w), then three stride-2 conv3x3 (w -> w -> 2w -> 2w), SiLU between; a 1x1 conv maps frame
0's features, and the channel-concatenated features of each 4-frame group, to z_dim. The decoder mirrors it with
nearest x2 upsampling. Functional API as every model: `encode/decode(cfg, params, ...)`, params a plain dict.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pickstyle_jax.models import layers, vae

_REPLICATED = (None,)


@dataclasses.dataclass(frozen=True)
class ConvAeConfig:
    width: int = 32
    z_dim: int = 16
    latents_mean: tuple[float, ...] = (0.0,) * 16
    latents_std: tuple[float, ...] = (1.0,) * 16
    dtype: str = "float32"

    def __post_init__(self):
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @classmethod
    def named(cls, name: str) -> "ConvAeConfig":
        variants = {"demo": cls(), "tiny": cls(width=4)}
        if name not in variants:
            raise ValueError(f"unknown conv autoencoder config {name!r}; expected one of {sorted(variants)}")
        return variants[name]

    def replace(self, **kw) -> "ConvAeConfig":
        return dataclasses.replace(self, **kw)

    @property
    def temporal_factor(self) -> int:
        return 4

    @property
    def spatial_factor(self) -> int:
        return 8


class Conv(nnx.Module):
    """kernel [k, k, I, O] (fan-in normal) and bias [O] (zeros)."""

    def __init__(self, k: int, cin: int, cout: int, *, rngs: nnx.Rngs):
        draw = jax.random.normal(rngs.params(), (k, k, cin, cout), jnp.float32) / math.sqrt(k * k * cin)
        self.kernel = layers.param(draw, _REPLICATED * 4)
        self.bias = layers.param(jnp.zeros((cout,), jnp.float32), _REPLICATED)

    def __call__(self, x_NHWC, stride: int = 1):
        k = self.kernel[...].astype(x_NHWC.dtype)
        y = jax.lax.conv_general_dilated(x_NHWC, k, (stride, stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(y.dtype)


class ConvAe(nnx.Module):
    def __init__(self, cfg: ConvAeConfig, *, rngs: nnx.Rngs):
        w, z, tf = cfg.width, cfg.z_dim, cfg.temporal_factor
        self.encoder = nnx.Dict({"0": Conv(3, 3, w, rngs=rngs), "1": Conv(3, w, w, rngs=rngs),
                                 "2": Conv(3, w, 2 * w, rngs=rngs), "3": Conv(3, 2 * w, 2 * w, rngs=rngs)})
        self.to_z0, self.to_z = Conv(1, 2 * w, z, rngs=rngs), Conv(1, tf * 2 * w, z, rngs=rngs)
        self.from_z0, self.from_z = Conv(1, z, 2 * w, rngs=rngs), Conv(1, z, tf * 2 * w, rngs=rngs)
        self.decoder = nnx.Dict({"0": Conv(3, 2 * w, 2 * w, rngs=rngs), "1": Conv(3, 2 * w, w, rngs=rngs),
                                 "2": Conv(3, w, w, rngs=rngs), "3": Conv(3, w, 3, rngs=rngs)})

    def encode(self, x_BFHWC, tf: int):
        b, f, h, w, _ = x_BFHWC.shape
        e = self.encoder
        y = jax.nn.silu(e["0"](x_BFHWC.reshape(b * f, h, w, 3)))
        y = jax.nn.silu(e["1"](y, 2))
        y = jax.nn.silu(e["2"](y, 2))
        y = e["3"](y, 2)
        y = y.reshape(b, f, *y.shape[1:])
        z0 = self.to_z0(y[:, 0])[:, None]
        k = (f - 1) // tf
        if not k:
            return z0
        g = y[:, 1:].reshape(b, k, tf, *y.shape[2:]).transpose(0, 1, 3, 4, 2, 5)  # [B, k, h, w, tf, C]
        zk = self.to_z(g.reshape(b * k, *g.shape[2:4], -1)).reshape(b, k, *g.shape[2:4], -1)
        return jnp.concatenate([z0, zk], axis=1)

    def decode(self, z_BThwC, tf: int):
        b, t, h, w, _ = z_BThwC.shape
        y = self.from_z0(z_BThwC[:, 0])[:, None]
        if t > 1:
            g = self.from_z(z_BThwC[:, 1:].reshape(b * (t - 1), h, w, -1))
            g = g.reshape(b, t - 1, h, w, tf, -1).transpose(0, 1, 4, 2, 3, 5).reshape(b, (t - 1) * tf, h, w, -1)
            y = jnp.concatenate([y, g], axis=1)
        frames = y.shape[1]
        y = jax.nn.silu(y.reshape(b * frames, h, w, -1))
        up = lambda v: jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2)  # noqa: E731
        d = self.decoder
        for i in ("0", "1", "2"):
            y = jax.nn.silu(d[i](up(y)))
        y = d["3"](y)
        return y.reshape(b, frames, *y.shape[1:])


# ---------------------------------------------------------------------------------------------------- params
def init(cfg: ConvAeConfig, rng) -> dict:
    return layers.init_params(ConvAe, cfg, rng)


def param_shapes(cfg: ConvAeConfig) -> dict:
    return jax.tree.map(lambda s: tuple(s.shape), layers.abstract_params(ConvAe, cfg))


def param_axes(cfg: ConvAeConfig) -> dict:
    return layers.logical_axes(ConvAe, cfg)


def num_params(cfg: ConvAeConfig) -> int:
    return int(sum(np.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))))


# ----------------------------------------------------------------------------------------------- execution
def _bound(cfg, params) -> ConvAe:
    dt = jnp.dtype(cfg.dtype)
    return layers.bind(ConvAe, cfg, jax.tree.map(lambda a: a.astype(dt), params))


@partial(jax.jit, static_argnames=("cfg",))
def _encode(cfg: ConvAeConfig, params, video):
    mu = _bound(cfg, params).encode(video.astype(jnp.dtype(cfg.dtype)), cfg.temporal_factor).astype(jnp.float32)
    return (mu - jnp.asarray(cfg.latents_mean, jnp.float32)) / jnp.asarray(cfg.latents_std, jnp.float32)


@partial(jax.jit, static_argnames=("cfg", "clamp"))
def _decode(cfg: ConvAeConfig, params, z, clamp: bool = True):
    z = z.astype(jnp.float32) * jnp.asarray(cfg.latents_std, jnp.float32) + jnp.asarray(cfg.latents_mean,
                                                                                         jnp.float32)
    out = _bound(cfg, params).decode(z.astype(jnp.dtype(cfg.dtype)), cfg.temporal_factor).astype(jnp.float32)
    return jnp.clip(out, -1.0, 1.0) if clamp else out


def encode(cfg: ConvAeConfig, params, video, *, chunked: bool = True):
    """Pixels [B, F, H, W, 3] in [-1, 1] -> normalised latents [B, 1+(F-1)//4, H/8, W/8, z_dim], float32.
    `chunked` is accepted for the VAE interface; every 4-frame group is coded on its own either way."""
    del chunked
    return _encode(cfg, params, vae.check_video(cfg, video))


def decode(cfg: ConvAeConfig, params, z, *, chunked: bool = True, tile_size=None, tile_stride=None,
           clamp: bool = True):
    """Normalised latents [B, T, h, w, z_dim] -> pixels [B, 1+4(T-1), 8h, 8w, 3], float32, clamped to [-1, 1] if
    `clamp`. Spatial tiling is a Wan VAE memory option: this model decodes whole clips (tile_size must be None)."""
    del chunked, tile_stride
    if tile_size is not None:
        raise ValueError("tile_size: the conv autoencoder decodes whole clips; tiling is for the Wan VAE")
    return _decode(cfg, params, vae.check_latents(cfg, z), bool(clamp))
