"""The frozen `base` of the train step (step.py): the DiT and the VAE, loaded from converted checkpoints or
randomly initialised, straight into their shardings, and E(zero clip), PickStyle's inactive context. Nothing here
is trained, differentiated or donated.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import conditioning, sharding
from pickstyle_jax.models import autoencoders, wan

f32 = jnp.float32


def _has_field(cls, name) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


def wan_unstacked(wcfg):
    return wcfg.replace(scan_layers=False) if _has_field(wan.WanConfig, "scan_layers") else wcfg


def count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def load_dit(config, wcfg, mesh, rules):
    """Frozen DiT params placed in their shardings: from the checkpoint dir, or a random init of the variant.

    A checkpoint brings its architecture; the layout (config.model.scan_layers) and the other run-time settings
    are the run's. Checkpoints hold the flat tree whatever layout their config.json names, and `load_dit` stacks
    on load, so the shardings are those of the layout the run uses."""
    from pickstyle_jax import checkpoints

    m = config.model
    if m.dit:
        meta = checkpoints.read_meta(m.dit)
        runtime = {k: getattr(wcfg, k) for k in ("param_dtype", "dtype", "attention", "remat_policy", "scan_layers")}
        wcfg = checkpoints.config_from_dict("wan", meta["config"]).replace(**runtime)
        sh = sharding.tree_shardings(wan.param_axes(wcfg), mesh, rules, wan.param_shapes(wcfg))
        _, params = checkpoints.load_dit(m.dit, scan_layers=wcfg.scan_layers, dtype=jnp.dtype(wcfg.param_dtype),
                                         sharding=sh)
        return wcfg, params
    flat_cfg = wan_unstacked(wcfg)
    sh = sharding.tree_shardings(wan.param_axes(flat_cfg), mesh, rules, wan.param_shapes(flat_cfg))
    params = reinit_dit(flat_cfg, config.seed, sh)
    if getattr(wcfg, "scan_layers", False):
        stacked_sh = sharding.tree_shardings(wan.param_axes(wcfg), mesh, rules, wan.param_shapes(wcfg))
        params = jax.jit(functools.partial(wan.stack_layers, wcfg), out_shardings=stacked_sh,
                         donate_argnums=0)(params)
    return wcfg, params


def reinit_dit(flat_cfg, seed: int, shardings=None):
    """The DiT of a run without model.dit, the flat tree: random_dit from fold_in(key(seed), 3), so evaluate.py
    redraws exactly the base a run trained on."""
    rng = jax.random.fold_in(jax.random.key(seed), 3)
    if count(wan.param_shapes(flat_cfg)) < 50_000_000:  # small: eager, no minute-long compile of the init
        params = random_dit(flat_cfg, rng)
        return params if shardings is None else jax.device_put(params, shardings)
    return jax.jit(functools.partial(random_dit, flat_cfg), out_shardings=shardings)(rng)


def random_dit(wcfg, rng, noise: float = 0.02):
    """wan.init with live paths: the official init zeroes the head and the VACE before/after projections, which
    leaves every LoRA gradient exactly zero. Here those kernels are drawn N(0, 1/fan_in) and every other leaf gets
    N(0, noise^2) added. For random-weight runs only (tests, plans, smoke runs)."""
    params = wan.init(wcfg, rng)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(flat))
    out = []
    for (kp, a), k in zip(flat, keys):
        names = [str(getattr(p, "key", p)) for p in kp]
        if names[-1] == "kernel" and {"head", "before_proj", "after_proj"} & set(names):
            std = a.shape[-2] ** -0.5
        else:
            std = noise
        out.append((a.astype(f32) + std * jax.random.normal(k, a.shape, f32)).astype(a.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_vae(config, vcfg, mesh):
    from pickstyle_jax import checkpoints

    rep = sharding.replicated(mesh)
    if config.model.vae:
        vcfg, params = checkpoints.load_vae(config.model.vae, sharding=rep)
        return vcfg, params
    return vcfg, jax.device_put(autoencoders.random_params(vcfg, config.seed), rep)


def zero_latent(config, vcfg, vparams, mesh):
    """E(zero clip) [1, f, h, w, 16]: PickStyle's inactive context, a constant (non-zero: normalised) latent."""
    d = config.data
    encode = jax.jit(functools.partial(autoencoders.encode, vcfg), out_shardings=sharding.replicated(mesh))
    return encode(vparams, conditioning.zero_clip(d.frames, d.height, d.width))
