"""Random weights for the tiny models of the CLI and evaluator tests, drawn with numpy (cheap: no compile)."""
from pathlib import Path

import jax
import numpy as np

from pickstyle_jax.models import vae


def vae_params(vcfg: vae.VaeConfig, rng: np.random.Generator) -> dict:
    """vae.init's distribution drawn with numpy (jitting vae.init costs tens of seconds of compile on 2 cores)."""
    def one(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return rng.standard_normal(shape, dtype=np.float32) / np.sqrt(np.prod(shape[:-1]))
        return (np.ones if leaf == "scale" else np.zeros)(shape, np.float32)

    return jax.tree_util.tree_map_with_path(one, vae.param_shapes(vcfg), is_leaf=lambda x: isinstance(x, tuple))


def save_models(models_dir, lora_dir, cfg, seed: int) -> dict:
    """Random tiny DiT (`cfg`), VAE, umT5 and a non-zero LoRA saved as checkpoint dirs; returns their paths.

    The DiT and LoRA are drawn with numpy (no compile); the DiT is scaled so the random model is not ~zero. As
    `convert.wan_dit` does, the weights are the flat tree (official paths) and config.json records the
    architecture `cfg`; the layout they load in is the loader's choice (`wan.Options.scan_layers`).
    """
    from pickstyle_jax import checkpoints, lora
    from pickstyle_jax.models import umt5, wan

    rng = np.random.default_rng(seed)
    models_dir, lora_dir = Path(models_dir), Path(lora_dir)
    flat = wan.param_shapes(cfg)
    params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, dtype=np.float32), flat)
    checkpoints.save(models_dir / "dit", cfg, params, kind="wan")
    adapters = lora.init(lora.LoraConfig(rank=4, alpha=4), flat, jax.random.key(seed))
    adapters = jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape, dtype=np.float32), adapters)
    checkpoints.save_lora(lora_dir, adapters)
    vcfg = vae.VaeConfig.named("tiny")
    checkpoints.save(models_dir / "vae", vcfg, vae_params(vcfg, rng), kind="vae")
    tcfg = umt5.Umt5Config.named("tiny")
    checkpoints.save(models_dir / "umt5", tcfg, umt5.init(tcfg, jax.random.key(seed + 1)), kind="umt5")
    return {**{k: str(models_dir / k) for k in ("dit", "vae", "umt5")}, "lora": str(lora_dir)}
