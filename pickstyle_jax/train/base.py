"""The frozen `base` of the train step (step.py): the DiT and the VAE, loaded from converted checkpoints or
randomly initialised, straight into their shardings, and E(zero clip), PickStyle's inactive context. Nothing here
is trained, differentiated or donated.
"""
from __future__ import annotations

import functools

import jax

from pickstyle_jax import conditioning, sharding
from pickstyle_jax.base import load_base, options_from
from pickstyle_jax.models import autoencoders

__all__ = ["load_dit", "load_vae", "zero_latent"]


def load_dit(config, wcfg, mesh, rules):
    """(WanConfig, frozen DiT params) placed in their shardings: from the checkpoint dir, or a random init of the
    variant (`base.load_base`). A checkpoint brings its architecture; the weights' dtype (config.model.param_dtype)
    and the layout (config.model.scan_layers, `base.options_from`) are the run's."""
    b = load_base(config.model.dit, dit_config=wcfg, options=options_from(config.model), dtype=wcfg.param_dtype,
                  seed=config.seed, mesh=mesh, rules=rules)
    return b.cfg, b.params


def load_vae(config, vcfg, mesh):
    b = load_base(vae=config.model.vae, vae_config=vcfg, seed=config.seed, mesh=mesh)
    return b.vae_cfg, b.vae_params


def zero_latent(config, vcfg, vparams, mesh):
    """E(zero clip) [1, f, h, w, 16]: PickStyle's inactive context, a constant (non-zero: normalised) latent."""
    d = config.data
    encode = jax.jit(functools.partial(autoencoders.encode, vcfg), out_shardings=sharding.replicated(mesh))
    return encode(vparams, conditioning.zero_clip(d.frames, d.height, d.width))
