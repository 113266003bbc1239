"""Device meshes and logical-axis sharding rules.

Models name the axes of their parameters with a few logical names (`wan.param_axes(cfg)`: "embed", "heads", "mlp",
"mod", None); a config maps each logical name to mesh axes. The same model code then runs replicated on one CPU,
data-parallel on a GPU box, or FSDP x tensor-parallel on a TPU pod: only the rules and the mesh change.

Typical use (flax lm1b style: eval_shape -> shardings -> jit(init, out_shardings=...)):

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    shardings = sharding.tree_shardings(wan.param_axes(cfg), mesh, sharding.DEFAULT_RULES, wan.param_shapes(cfg))
    params = jax.jit(functools.partial(wan.init, cfg), out_shardings=shardings)(rng)
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",   # FSDP: weights split along the model width, gathered per layer
    "heads": "tensor",  # tensor parallelism over attention heads ...
    "mlp": "tensor",   # ... and the FFN hidden dimension
    "mod": None,
    "length": None,
}


def make_mesh(shape: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A mesh with named axes; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = list(shape), list(shape.values())
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def logical_to_spec(axes: Sequence[str | None], rules: Mapping, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for one array. With `shape`, a dimension its mesh axes do not divide stays replicated
    (tiny test models on 8 devices), and a mesh axis is used at most once per array."""
    used, spec = set(), []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and a not in used)
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape is not None and (size == 0 or shape[i] % size):
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _is_axes(x):
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, mesh: Mesh, rules: Mapping, shapes_tree=None):
    """NamedSharding for every leaf of a logical-axes tree (shapes make undividable dims replicated)."""
    if shapes_tree is None:
        return jax.tree.map(lambda ax: NamedSharding(mesh, logical_to_spec(ax, rules, mesh)), axes_tree,
                            is_leaf=_is_axes)
    return jax.tree.map(lambda ax, s: NamedSharding(mesh, logical_to_spec(ax, rules, mesh, s.shape)),
                        axes_tree, shapes_tree, is_leaf=_is_axes)


def shard(tree, axes_tree, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """device_put a host tree onto the mesh following its logical axes."""
    return jax.device_put(tree, tree_shardings(axes_tree, mesh, rules, tree))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
