"""Flat <-> stacked layout of the Wan DiT's parameter trees, for scanned layers (models/wan.py, `Options.scan_layers`).

The flat tree keys every block by its index, as the official checkpoints do (`blocks.3.self_attn.q.kernel`); the
stacked tree, which `wan.forward` scans, holds each block leaf once with a leading layer axis, and VACE block 0's
before_proj hoisted to params["vace_before_proj"] (the layout is spelled out in models/wan.py's docstring).
`stack_layers` / `unstack_layers` convert exactly, also on ShapeDtypeStruct trees; `stack_lora` stacks a partial
LoRA tree with zero adapters where a layer has none. Pure tree code, no modules; `cfg` is a `wan.WanConfig`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STACKED_AXIS = "layers"  # logical name of the leading axis of stacked (scanned) parameters
STACKED_KEYS = ("blocks", "vace_blocks", "vace_before_proj")  # the top-level keys that differ between layouts


def scan_period(cfg) -> int:
    """P, the main blocks per VACE super-block of a scanned VACE model (num_layers for T2V); raises if the VACE
    layers are not (0, P, 2P, ...) with num_layers = J * P."""
    if not cfg.has_vace:
        return cfg.num_layers
    j = len(cfg.vace_layers)
    period = cfg.num_layers // j
    if cfg.num_layers % j or cfg.vace_layers != tuple(range(0, cfg.num_layers, period)):
        raise ValueError(f"scanned layers (the stacked tree) need regularly spaced vace_layers (0, P, 2P, ...) with "
                         f"num_layers = J * P; got vace_layers {cfg.vace_layers} over {cfg.num_layers} layers. Use "
                         f"the flat tree (Options(scan_layers=False)) for this config: the blocks then run unrolled")
    return period


def leaf_paths(tree, prefix=()):
    """{path tuple: leaf} of a nested dict (anything that is not a dict is a leaf)."""
    out = {}
    for key, sub in tree.items():
        if isinstance(sub, dict):
            out.update(leaf_paths(sub, prefix + (key,)))
        else:
            out[prefix + (key,)] = sub
    return out


def _nest(paths):
    out: dict = {}
    for path, leaf in paths.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _groups(cfg):
    return (("blocks", cfg.num_layers),) + ((("vace_blocks", len(cfg.vace_layers)),) if cfg.has_vace else ())


def stack_tree(cfg, tree, stack, *, fill=None):
    """Flat -> stacked layout; stack(list of n per-layer leaves) -> leaf. With `fill(like)`, a path missing from
    some layers (a partial LoRA tree) is filled from fill(a present leaf); otherwise it is an error."""
    scan_period(cfg)
    out = {k: v for k, v in tree.items() if k not in ("blocks", "vace_blocks")}
    for name, n in _groups(cfg):
        sub = tree.get(name)
        if sub is None:
            continue
        want = {str(i) for i in range(n)}
        if not set(sub) <= want or (fill is None and set(sub) != want):
            raise ValueError(f"params[{name!r}] has keys {sorted(sub)[:8]}..., expected the flat layout with keys "
                             f"'0'..'{n - 1}' (is it already stacked?)")
        per_layer = [leaf_paths(sub.get(str(i), {})) for i in range(n)]
        if name == "vace_blocks" and any(p[0] == "before_proj" for p in per_layer[0]):
            out["vace_before_proj"] = sub["0"]["before_proj"]
            per_layer[0] = {p: v for p, v in per_layer[0].items() if p[0] != "before_proj"}
        stacked = {}
        for path in sorted(set().union(*per_layer)):
            leaves = [layer.get(path) for layer in per_layer]
            present = next(leaf for leaf in leaves if leaf is not None)
            if fill is None and any(leaf is None for leaf in leaves):
                raise ValueError(f"{name}.*.{'.'.join(path)} is missing from some layers")
            stacked[path] = stack([fill(present) if leaf is None else leaf for leaf in leaves])
        out[name] = _nest(stacked)
    return out


def _unstack(cfg, tree, index):
    """Stacked -> flat layout; index(leaf, i) -> the i-th layer's leaf."""
    scan_period(cfg)
    out = {k: v for k, v in tree.items() if k not in STACKED_KEYS}
    for name, n in _groups(cfg):
        if name not in tree:
            continue
        if "0" in tree[name]:
            raise ValueError(f"params[{name!r}] is already in the flat layout (keys '0', '1', ...)")
        paths = leaf_paths(tree[name])
        out[name] = {str(i): _nest({p: index(leaf, i) for p, leaf in paths.items()}) for i in range(n)}
    if "vace_before_proj" in tree:
        out.setdefault("vace_blocks", {}).setdefault("0", {})["before_proj"] = tree["vace_before_proj"]
    return out


def _np_or_jnp(leaves):
    return np if all(isinstance(leaf, np.ndarray) for leaf in leaves) else jnp


def stack_layers(cfg, params, *, stack=None):
    """The flat tree (official paths) -> the stacked tree, which `forward` scans (wan.py's docstring).
    Exact; numpy leaves stay numpy (on the host), others become jax arrays; works on ShapeDtypeStruct trees.
    stack: optional function (list of the n per-layer leaves) -> stacked leaf, replacing the default."""
    def default(leaves):
        if isinstance(leaves[0], jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
        return _np_or_jnp(leaves).stack(leaves)

    return stack_tree(cfg, params, stack or default)


def unstack_layers(cfg, params):
    """Exact inverse of `stack_layers` (also on ShapeDtypeStruct trees and trees of per-layer Shardings)."""
    def index(leaf, i):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
        if isinstance(leaf, jax.sharding.Sharding):  # a tree of per-layer shardings: every layer gets the leaf
            return leaf
        return leaf[i]

    return _unstack(cfg, params, index)


def stack_lora(cfg, adapter_params):
    """A flat LoRA tree (official paths, {"A", "B"} leaves) in the stacked layout; layers that carry no adapter
    get zeros, which add exactly nothing to the output and receive no gradient that matters."""
    return stack_tree(cfg, adapter_params, lambda leaves: jnp.stack(leaves), fill=jnp.zeros_like)


def is_stacked(cfg, params) -> bool:
    """Whether `params` is the stacked tree (params["blocks"] keyed by leaf name, not by layer index '0', '1', ...);
    raises if the tree is stacked but `cfg` cannot be scanned (`scan_period`)."""
    blocks = params.get("blocks") if isinstance(params, dict) else None
    stacked = isinstance(blocks, dict) and "0" not in blocks
    if stacked:
        scan_period(cfg)
    return stacked
