"""The pixel <-> latent models behind one interface, chosen by the config's type.

Real runs use the Wan2.1 VAE (models/vae.py, converted weights); the CPU demo can fit the plain convolutional
autoencoder of models/conv_ae.py, which has the same latent geometry. Everything outside models/ calls these
functions with the config it loaded, so the sampler, the trainer and the evaluator never branch on the model:

    encode(cfg, params, video, chunked=...)   pixels [B, 1+4k, H, W, 3] in [-1, 1] -> latents [B, 1+k, H/8, W/8, z]
    decode(cfg, params, z, chunked=..., tile_size=..., clamp=...)
    param_shapes(cfg), random_params(cfg, seed), num_params(cfg), kind(cfg) (the checkpoint kind), describe(cfg)
"""
from __future__ import annotations

import math

import jax
import numpy as np

from pickstyle_jax.models import conv_ae, vae

# checkpoint kind -> (module, config class)
KINDS = {"vae": (vae, vae.VaeConfig), "conv_ae": (conv_ae, conv_ae.ConvAeConfig)}


def kind(cfg) -> str:
    for name, (_, cls) in KINDS.items():
        if isinstance(cfg, cls):
            return name
    raise TypeError(f"{type(cfg).__name__} is not an autoencoder config; expected one of "
                    f"{[cls.__name__ for _, cls in KINDS.values()]}")


def module(cfg):
    return KINDS[kind(cfg)][0]


def encode(cfg, params, video, *, chunked: bool = True):
    return module(cfg).encode(cfg, params, video, chunked=chunked)


def decode(cfg, params, z, *, chunked: bool = True, tile_size=None, tile_stride=(192, 192), clamp: bool = True):
    return module(cfg).decode(cfg, params, z, chunked=chunked, tile_size=tile_size, tile_stride=tile_stride,
                              clamp=clamp)


def param_shapes(cfg) -> dict:
    return module(cfg).param_shapes(cfg)


def random_params(cfg, seed: int) -> dict:
    """`init`'s distribution (fan-in normal kernels, zero biases, unit norm gammas) drawn eagerly with numpy, float32:
    jitting the VAE's init compiles for minutes on a small CPU."""
    rng = np.random.default_rng((int(seed), 5))

    def one(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return (rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))).astype(np.float32)
        return (np.ones if leaf == "scale" else np.zeros)(shape, np.float32)

    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def num_params(cfg) -> int:
    return module(cfg).num_params(cfg)


def describe(cfg) -> str:
    if isinstance(cfg, vae.VaeConfig):
        return f"Wan VAE architecture, base_dim {cfg.base_dim}"
    return f"plain conv autoencoder, width {cfg.width}"
