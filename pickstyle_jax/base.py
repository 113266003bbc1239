"""The frozen base models every caller starts from: one `load_base` for the trainer, the stylizer and the evaluator.

    base = load_base(dit=DIR, vae=DIR, umt5=DIR, options=wan.Options.default(scan_layers=True), mesh=mesh)
    base.cfg, base.params, base.options          the DiT: architecture, weights in the layout asked for, run options
    base.vae_cfg, base.vae_params                the autoencoder (the Wan VAE or the demo's, models/autoencoders.py)
    base.text_cfg, base.text_params              the umT5 encoder (None unless asked for)

Each model comes from its converted checkpoint directory or, when the path is empty and a config is given, is drawn
at random exactly as a training run without that checkpoint drew it (`reinit_dit`, `autoencoders.random_params`,
`umt5.init` from fold_in(key(seed), 4)), so an evaluation redraws the base a run trained on. On a mesh the DiT is
placed in the shardings its logical axes and the rules give (in the requested layout), the VAE and umT5 replicated.
A checkpoint always brings its own architecture; `options` (`wan.Options`, never saved) say how it runs and
options.scan_layers which layout the DiT params come in. `options_from` maps a config's `model.*` keys (configs/*.py,
a run's config.json) to options.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax import checkpoints, sharding
from pickstyle_jax.models import autoencoders, wan
from pickstyle_jax.models import umt5 as umt5_lib

__all__ = ["Base", "load_base", "options_from", "OPTION_KEYS", "reinit_dit", "random_dit", "count"]

f32 = jnp.float32

OPTION_KEYS = tuple(f.name for f in dataclasses.fields(wan.Options))  # config.model keys that are wan.Options


@dataclasses.dataclass(frozen=True)
class Base:
    """What `load_base` returns; a part that was not asked for is None."""
    cfg: wan.WanConfig | None
    params: Any
    options: wan.Options
    vae_cfg: Any = None
    vae_params: Any = None
    text_cfg: umt5_lib.Umt5Config | None = None
    text_params: Any = None


def options_from(model: Mapping, **overrides) -> wan.Options:
    """wan.Options from a config's `model` section (a ConfigDict or a run's config.json dict): every key of
    OPTION_KEYS it sets (not None or "") overrides this backend's default (`wan.Options.default`), then
    `overrides`. Raises ValueError for a value the options refuse."""
    given = {k: model.get(k) for k in OPTION_KEYS if model.get(k) not in (None, "")}
    return wan.Options.default(**{**given, **overrides})


def count(tree) -> int:
    """Elements in a pytree of arrays or shapes (parameter counts)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def random_dit(wcfg, rng, noise: float = 0.02):
    """wan.init with live paths: the official init zeroes the head and the VACE before/after projections, which
    leaves every LoRA gradient exactly zero. Here those kernels are drawn N(0, 1/fan_in) and every other leaf gets
    N(0, noise^2) added. The flat tree. For random-weight runs only (tests, plans, smoke runs)."""
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


def reinit_dit(wcfg, seed: int, shardings=None):
    """The DiT of a run without model.dit, the flat tree: random_dit from fold_in(key(seed), 3), so the evaluator
    redraws exactly the base a run trained on. shardings: of the flat tree (None: the default device)."""
    rng = jax.random.fold_in(jax.random.key(seed), 3)
    if count(wan.param_shapes(wcfg)) < 50_000_000:  # small: eager, no minute-long compile of the init
        params = random_dit(wcfg, rng)
        return params if shardings is None else jax.device_put(params, shardings)
    return jax.jit(functools.partial(random_dit, wcfg), out_shardings=shardings)(rng)


def _dit_shardings(cfg, stacked: bool, mesh, rules):
    if mesh is None:
        return None
    return sharding.tree_shardings(wan.param_axes(cfg, stacked=stacked), mesh, rules,
                                   wan.param_shapes(cfg, stacked=stacked))


def _load_dit(path, cfg, options, dtype, seed, mesh, rules):
    stacked = bool(options.scan_layers)
    if path:
        cfg = checkpoints.read_config(path, "wan")  # the checkpoint's architecture, whatever `cfg` says
        if dtype is not None:
            cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
        return checkpoints.load_dit(path, dtype=dtype, sharding=_dit_shardings(cfg, stacked, mesh, rules),
                                    scan_layers=stacked)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
    params = reinit_dit(cfg, seed, _dit_shardings(cfg, False, mesh, rules))
    if stacked:
        if mesh is None:
            params = wan.stack_layers(cfg, params)
        else:
            params = jax.jit(functools.partial(wan.stack_layers, cfg), donate_argnums=0,
                             out_shardings=_dit_shardings(cfg, True, mesh, rules))(params)
    return cfg, params


def load_base(dit: str = "", vae: str = "", umt5: str = "", *, dit_config: wan.WanConfig | None = None,
              vae_config=None, umt5_config: umt5_lib.Umt5Config | None = None, options: wan.Options | None = None,
              dtype=None, seed: int = 0, mesh=None, rules=None) -> Base:
    """The base models (module docstring). Each of the DiT, the VAE and the umT5 is read from its checkpoint
    directory if given, else drawn at random from its config if one is given (the DiT from `seed` via
    `reinit_dit`, the VAE via `autoencoders.random_params(vae_config, seed)`, the umT5 from fold_in(key(seed), 4)),
    else left out (None).

    options: the DiT's run-time `wan.Options`; options.scan_layers picks the layout of the returned params. None:
      `wan.Options.default()`, with `dtype` as its compute dtype when a dtype is given.
    dtype: the DiT weights' dtype: a checkpoint is cast to it while reading, a random DiT created in it (None: as
      stored, or the config's param_dtype).
    mesh, rules: place the DiT in the shardings of `wan.param_axes` under `rules` (sharding.DEFAULT_RULES if None)
      and the VAE and umT5 replicated on `mesh`; None: the default device.
    """
    if options is None:
        options = wan.Options.default(**({} if dtype is None else {"dtype": np.dtype(dtype).name}))
    rules = sharding.DEFAULT_RULES if rules is None else rules
    rep = None if mesh is None else sharding.replicated(mesh)
    place = (lambda tree: jax.device_put(tree)) if rep is None else (lambda tree: jax.device_put(tree, rep))
    cfg = params = None
    if dit or dit_config is not None:
        cfg, params = _load_dit(dit, dit_config, options, dtype, seed, mesh, rules)
    vae_cfg, vae_params = vae_config, None
    if vae:
        vae_cfg, vae_params = checkpoints.load_vae(vae, sharding=rep)
    elif vae_config is not None:
        vae_params = place(autoencoders.random_params(vae_config, seed))
    text_cfg, text_params = umt5_config, None
    if umt5:
        text_cfg, text_params = checkpoints.load_umt5(umt5, sharding=rep)
    elif umt5_config is not None:
        text_params = jax.jit(lambda k: umt5_lib.init(umt5_config, k), out_shardings=rep)(
            jax.random.fold_in(jax.random.key(seed), 4))
    return Base(cfg, params, options, vae_cfg, vae_params, text_cfg, text_params)
