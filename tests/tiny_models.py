"""Random weights for the tiny models of the CLI and evaluator tests, drawn with numpy (cheap: no compile)."""
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
