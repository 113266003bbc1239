"""The pixel <-> latent model (the autoencoder) behind one interface; the Wan2.1 VAE is the built-in one.

An autoencoder is a module that defines a frozen config dataclass (with `z_dim`, `latents_mean/std`,
`temporal_factor`, `spatial_factor`, as `vae.VaeConfig`) and the functional API of PROTOCOL:

    encode(cfg, params, video, *, chunked)   pixels [B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents
                                             [B, 1+k, H/8, W/8, z_dim]
    decode(cfg, params, z, *, chunked, tile_size, tile_stride, clamp)
    param_shapes(cfg)                        a tree of shape tuples, paths as the params'

A config's autoencoder is the module that defines its class: models/vae.py for `VaeConfig`, the built-in one.
Another autoencoder (the CPU demo's pickstyle_jax/demo/conv_ae.py) is named by the import path of its config class,
"module:Class" (`config_path`): an autoencoder checkpoint's config.json records it (checkpoints.save), and loading
resolves it with importlib (`config_class`), so production code never imports it. Everything outside models/ calls
the functions below with the config it loaded; nothing branches on which autoencoder it is.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from types import ModuleType

import jax
import numpy as np

PROTOCOL = ("encode", "decode", "param_shapes")


def _protocol_module(module: ModuleType, what: str) -> ModuleType:
    missing = [f for f in PROTOCOL if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"{what} is not an autoencoder: its module {module.__name__} lacks {missing} "
                        f"(models/autoencoders.py: PROTOCOL)")
    return module


def module(cfg) -> ModuleType:
    """The module implementing cfg's autoencoder: the one that defines cfg's class."""
    return _protocol_module(sys.modules[type(cfg).__module__], type(cfg).__name__)


def config_path(cfg) -> str:
    """"module:Class" of cfg's class: what an autoencoder checkpoint records as its "codec"."""
    module(cfg)
    return f"{type(cfg).__module__}:{type(cfg).__qualname__}"


def config_class(path: str) -> type:
    """The config class named by "module:Class" (`config_path`), imported; its module must follow PROTOCOL."""
    mod_name, _, name = str(path).partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), name) if name else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"autoencoder {path!r} cannot be imported ({e}); expected 'module:ConfigClass'") from e
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"autoencoder {path!r} does not name a config dataclass; expected 'module:ConfigClass'")
    _protocol_module(sys.modules[cls.__module__], path)
    return cls


def encode(cfg, params, video, *, chunked: bool = True):
    return module(cfg).encode(cfg, params, video, chunked=chunked)


def decode(cfg, params, z, *, chunked: bool = True, tile_size=None, tile_stride=(192, 192), clamp: bool = True):
    return module(cfg).decode(cfg, params, z, chunked=chunked, tile_size=tile_size, tile_stride=tile_stride,
                              clamp=clamp)


def param_shapes(cfg) -> dict:
    return module(cfg).param_shapes(cfg)


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def num_params(cfg) -> int:
    return int(sum(math.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=_is_shape)))


def random_params(cfg, seed: int) -> dict:
    """`init`'s distribution (fan-in normal kernels, zero biases, unit norm gammas) drawn eagerly with numpy, float32:
    jitting the VAE's init compiles for minutes on a small CPU."""
    rng = np.random.default_rng((int(seed), 5))

    def one(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return (rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))).astype(np.float32)
        return (np.ones if leaf == "scale" else np.zeros)(shape, np.float32)

    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg), is_leaf=_is_shape)
