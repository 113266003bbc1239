"""LoRA as a sibling pytree of the base parameters (docs/REFERENCE.md §6).

`Lora.params` mirrors the paths of the adapted Dense layers: the adapter of the base kernel at
`params["vace_blocks"]["0"]["self_attn"]["q"]["kernel"]` lives at `lora.params["vace_blocks"]["0"]["self_attn"]["q"]`
as {"A": [in, r], "B": [r, out]} (fp32). The config is static pytree metadata, so `jax.grad` w.r.t. a `Lora`
differentiates only A and B. The adapted layer computes y = x @ kernel + b + (alpha / rank) * (x @ A) @ B without
ever forming A @ B; `merge` folds the product into the kernels for export or inference.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 128
    alpha: float = 128.0
    targets: str = r"vace_blocks\.\d+\.self_attn\.(q|k|v)"  # re.fullmatch against dotted module paths

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lora:
    params: dict[str, Any]
    config: LoraConfig = dataclasses.field(metadata=dict(static=True))


def _dense_modules(tree, prefix=()):
    """Yield (path tuple, module dict) for every dict holding a 2D `kernel`."""
    if isinstance(tree, dict):
        if "kernel" in tree and getattr(tree["kernel"], "ndim", None) == 2:
            yield prefix, tree
        for key, sub in tree.items():
            if isinstance(sub, dict):
                yield from _dense_modules(sub, prefix + (key,))


def targets(lcfg: LoraConfig, params) -> list[str]:
    """Dotted paths of the Dense modules whose path fully matches `lcfg.targets`; raises if there are none."""
    pattern = re.compile(lcfg.targets)
    found = sorted((".".join(path) for path, _ in _dense_modules(params) if pattern.fullmatch(".".join(path))),
                   key=_natural_key)
    if not found:
        raise ValueError(f"LoRA target pattern {lcfg.targets!r} matches no Dense layer of the model")
    return found


def _natural_key(path):
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def _get(tree, path):
    for key in path.split("."):
        tree = tree[key]
    return tree


def _set(tree, path, value):
    keys = path.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def init(lcfg: LoraConfig, params, rng) -> Lora:
    """A ~ U(+-1/sqrt(in)) (torch's kaiming_uniform with a = sqrt(5)), B = 0; fp32. Works on abstract params."""
    tree: dict[str, Any] = {}
    paths = targets(lcfg, params)
    for path, key in zip(paths, jax.random.split(rng, len(paths))):
        fan_in, fan_out = _get(params, path)["kernel"].shape
        bound = 1.0 / fan_in**0.5
        _set(tree, path, {
            "A": jax.random.uniform(key, (fan_in, lcfg.rank), jnp.float32, -bound, bound),
            "B": jnp.zeros((lcfg.rank, fan_out), jnp.float32),
        })
    return Lora(tree, lcfg)


def adapter_paths(adapters: Lora) -> list[str]:
    """Dotted module paths that carry an {"A", "B"} adapter."""
    out = []

    def walk(tree, prefix):
        if "A" in tree and "B" in tree:
            out.append(".".join(prefix))
            return
        for key, sub in tree.items():
            walk(sub, prefix + (key,))

    walk(adapters.params, ())
    return sorted(out, key=_natural_key)


def merge(params, adapters: Lora):
    """Base params with kernel' = kernel + (alpha/rank) * A @ B, computed in fp32 and cast to the kernel dtype."""
    merged = jax.tree_util.tree_map(lambda x: x, params)  # fresh dict structure, leaves shared
    for path in adapter_paths(adapters):
        module = _get(merged, path)
        ad = _get(adapters.params, path)
        delta = adapters.config.scale * (ad["A"].astype(jnp.float32) @ ad["B"].astype(jnp.float32))
        module["kernel"] = (module["kernel"].astype(jnp.float32) + delta).astype(module["kernel"].dtype)
    return merged

