"""Device meshes and logical-axis sharding rules.

Models name the axes of their parameters with a few logical names (`wan.param_axes(cfg)`: "layers", "embed",
"heads", "mlp", "mod", None) and their activations with "batch", "length", "embed"; a config maps each logical name
to mesh axes (`config.rules`) over a named mesh (`config.mesh`). The same model code then runs replicated on one
CPU, data-parallel on a GPU box, or FSDP x tensor-parallel on a TPU pod: only the rules and the mesh change. A mesh
axis named "context" splits the video tokens ("length"; context parallelism: `layers.self_attention` gathers them
inside self-attention, Ulysses or ring) and, with fsdp, the weights ("embed"), so no device holds a whole copy.

Rules: {logical name: mesh axis | tuple/list of mesh axes | None (replicated)}, plus one option,
`"allow_replicate"`. A dimension whose mesh axes do not divide it is an error naming the array, its shape and the
rule, unless `allow_replicate` is true: then that dimension alone stays replicated (tiny test models on 8
devices). Mesh axes that the mesh lacks (e.g. "context" on a mesh without sequence sharding) are ignored, and a
mesh axis is used at most once per array. A `Units` axis (the models' "heads") is also checked against its unit
count: a tensor axis that does not divide num_heads is refused the same way, naming num_heads.

Typical use (eval_shape -> shardings -> jit(init, out_shardings=...)):

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    shardings = sharding.tree_shardings(wan.param_axes(cfg), mesh, rules, wan.param_shapes(cfg))
    params = jax.jit(functools.partial(wan.init, cfg), out_shardings=shardings)(rng)

A plain `jax.jit` of a model function on such params and batch-sharded inputs is right as it is: `wan.forward` and
`umt5.encode` read the mesh from the arrays they are given and pin their own layout (`layers.layout`), so their
values and gradients equal the one-device ones whatever the shardings. `rules_context` is an optional hint that
makes those pins follow the caller's rules instead of DEFAULT_RULES (no resharding when the weights follow other
rules):

    with sharding.rules_context(mesh, rules):
        step = jax.jit(...).lower(...).compile()
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

OPTIONS = ("allow_replicate",)  # rule keys that are options, not logical axes

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Permissive (allow_replicate) so that
# small models run on any mesh; training configs state their own, strict rules.
DEFAULT_RULES: dict = {
    "batch": ("data", "fsdp"),
    "layers": None,    # the stacked-layer axis of scanned parameters
    # FSDP: weights split along the model width, gathered per layer. The devices that split the video tokens
    # ("context") hold a share of the weights too, so a data x context mesh does not keep a whole copy per device
    "embed": ("fsdp", "context"),
    "heads": "tensor",  # tensor parallelism over attention heads ...
    "mlp": "tensor",   # ... and the FFN hidden dimension
    "mod": None,
    "vocab": None,     # umT5 token embedding rows (the encoder runs replicated or off-device)
    "length": "context",  # video tokens: context parallelism (layers.self_attention), when the mesh has the axis
    "allow_replicate": True,
}


class ShardingError(ValueError):
    """A mesh or rule that cannot shard an array (the message says what to change)."""


class Units(str):
    """A logical axis name whose dimension is `n_units` equal units that must stay whole on a device: attention
    heads, `Units("heads", cfg.num_heads, "num_heads")` in `wan.param_axes`. It equals (and hashes as) its plain
    name, so rules look it up as usual; the checks below also require its mesh axes to divide `n_units`. `what`
    names the setting the count comes from, for the error message."""

    n_units: int
    what: str

    def __new__(cls, name: str, n_units: int, what: str):
        obj = super().__new__(cls, name)
        obj.n_units, obj.what = int(n_units), what
        return obj

    def __getnewargs__(self):
        return str(self), self.n_units, self.what


def normalize_rules(rules: Mapping) -> dict:
    """A plain dict (ConfigDict and lists accepted); values become None, a str or a tuple of str."""
    out = {}
    for name, target in dict(rules).items():
        if name in OPTIONS:
            out[name] = bool(target)
        elif target is None or isinstance(target, str):
            out[name] = target
        elif isinstance(target, (list, tuple)) and all(isinstance(a, str) for a in target):
            out[name] = tuple(target)
        else:
            raise ShardingError(f"rule {name!r}: {target!r} is not a mesh axis name, a list of them, or None")
    return out


def axes_of(entry) -> tuple[str, ...]:
    """A rule's target or a PartitionSpec entry as a tuple of mesh-axis names (None: (), "fsdp": ("fsdp",))."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """{axis: size} with the one -1 size (if any) filled in so the sizes multiply to `n_devices`; a ShardingError
    saying what to change otherwise. The one resolver of mesh shapes: configs, CLIs and `make_mesh` use it."""
    try:
        names, sizes = list(shape), [int(s) for s in shape.values()]
    except (TypeError, ValueError) as e:
        raise ShardingError(f"mesh {shape!r}: sizes must be integers ({e})") from None
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dict(shape)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive or -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ShardingError(f"{n_devices} devices do not divide into mesh {dict(shape)}: the fixed axes "
                                f"need a multiple of {known} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ShardingError(f"mesh {dict(zip(names, sizes))} does not fit {n_devices} devices: its axes multiply to "
                            f"{math.prod(sizes)}; set the sizes so they multiply to {n_devices} (one may be -1)")
    return dict(zip(names, sizes))


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4} (a command-line mesh); sizes may be -1."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        try:
            if not eq or not name.strip():
                raise ValueError
            out[name.strip()] = int(size)
        except ValueError:
            raise ShardingError(f"mesh {spec!r}: write it as axis=size pairs, e.g. data=2,fsdp=4") from None
    if not out:
        raise ShardingError(f"mesh {spec!r} names no axis; e.g. data=2,fsdp=4")
    return out


def init_distributed(d: Mapping, where: str = "distributed") -> None:
    """jax.distributed from the multi-host settings `d` (keys coordinator "host:port", num_processes, process_id,
    auto), before any device is touched: auto=True lets JAX read the cluster (TPU pod, SLURM, OMPI, Kubernetes); a
    coordinator starts it explicitly; neither is a one-process run. The one home of this for train
    (`--config.distributed.*`) and stylize (`--distributed.*`); `where` prefixes the settings' names in errors."""
    if d["auto"]:
        jax.distributed.initialize()
    elif d["coordinator"]:
        if not 0 <= int(d["process_id"]) < int(d["num_processes"]):
            raise ShardingError(f"{where}.process_id={d['process_id']} is not in [0, {where}.num_processes="
                                f"{d['num_processes']})")
        jax.distributed.initialize(d["coordinator"], int(d["num_processes"]), int(d["process_id"]))
    elif int(d["num_processes"]) != 1:
        raise ShardingError(f"{where}.num_processes={d['num_processes']} needs {where}.coordinator=host:port "
                            f"(or {where}.auto=True on a TPU pod / SLURM / OMPI / Kubernetes)")


def make_mesh(shape: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A mesh with named axes; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape(list(sizes.values())), tuple(sizes))


def batch_mesh_axes(rules: Mapping, mesh_shape: Mapping[str, int], size: int | None = None) -> tuple[str, ...]:
    """The mesh axes the "batch" rule splits a leading dimension over, on a mesh of `mesh_shape` ({axis: size},
    e.g. `mesh.shape`). With `size`, only the longest prefix of them whose product divides it (3 CS-CFG branches of
    one sample on 2 data devices stay replicated rather than fail)."""
    target = normalize_rules(rules).get("batch")
    names = [t for t in axes_of(target) if t in mesh_shape]
    if size is None:
        return tuple(names)
    used, ways = [], 1
    for name in names:
        if size % (ways * mesh_shape[name]):
            break
        used.append(name)
        ways *= mesh_shape[name]
    return tuple(used)


def _mesh_axes(name, rules, mesh, used):
    if name is None:
        return ()
    if name not in rules or name in OPTIONS:
        raise KeyError(f"no sharding rule for logical axis {name!r}; rules cover "
                       f"{sorted(k for k in rules if k not in OPTIONS)}")
    target = rules[name]
    axes = axes_of(target)
    if mesh is not None:
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    return axes


def logical_to_spec(axes: Sequence[str | None], rules: Mapping, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None, *, name: str = "array") -> P:
    """PartitionSpec for one array with logical `axes`. With `mesh` and `shape`, a dimension its mesh axes do not
    divide is a ShardingError naming `name`, unless rules["allow_replicate"] (then it stays replicated); with
    `mesh`, so is a `Units` axis whose count they do not divide (it names the count's setting, e.g. num_heads)."""
    if shape is not None and len(shape) != len(axes):
        raise ShardingError(f"{name}: logical axes {tuple(axes)} do not match its shape {tuple(shape)}")
    used, spec = set(), []
    for i, logical in enumerate(axes):
        mesh_axes = _mesh_axes(logical, rules, mesh, used)
        if mesh is not None and mesh_axes:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            count = logical.n_units if isinstance(logical, Units) else None
            if count is not None and count % size:
                if not rules.get("allow_replicate", False):
                    raise ShardingError(
                        f"{name}: {logical.what}={count} does not split over mesh axes {mesh_axes} of size {size} "
                        f"(logical {str(logical)!r}); a unit of {logical.what} must stay whole on one device. Pick "
                        f"a mesh whose {mesh_axes} size divides {logical.what}, change config.rules[{str(logical)!r}], "
                        f"or set config.rules.allow_replicate=True to keep such dimensions replicated")
                mesh_axes = ()
            elif shape is not None and shape[i] % size:
                if not rules.get("allow_replicate", False):
                    raise ShardingError(
                        f"{name} of shape {tuple(shape)}: dimension {i} ({shape[i]}, logical {logical!r}) is not "
                        f"divisible by mesh axes {mesh_axes} of size {size}. Change config.mesh or "
                        f"config.rules[{logical!r}], or set config.rules.allow_replicate=True to keep such "
                        f"dimensions replicated")
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _is_axes(x):
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def path_name(kp) -> str:
    """A pytree key path as a dotted name (blocks.3.self_attn.q.kernel), for messages and memory plans."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)


def tree_shardings(axes_tree, mesh: Mesh, rules: Mapping = DEFAULT_RULES, shapes_tree=None):
    """NamedSharding for every leaf of a logical-axes tree; with shapes, dimensions are checked (logical_to_spec)
    and errors name the leaf's path."""
    rules = normalize_rules(rules)
    if shapes_tree is None:
        return jax.tree.map(lambda ax: NamedSharding(mesh, logical_to_spec(ax, rules, mesh)), axes_tree,
                            is_leaf=_is_axes)
    flat, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)
    shapes = treedef.flatten_up_to(shapes_tree)
    out = [NamedSharding(mesh, logical_to_spec(ax, rules, mesh, np.shape(s) if not hasattr(s, "shape") else s.shape,
                                               name=path_name(kp)))
           for (kp, ax), s in zip(flat, shapes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def shard(tree, axes_tree, mesh: Mesh, rules: Mapping = DEFAULT_RULES):
    """device_put a host tree onto the mesh following its logical axes."""
    return jax.device_put(tree, tree_shardings(axes_tree, mesh, rules, tree))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), normalize_rules(rules), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def flax_rules(rules: Mapping, mesh: Mesh | None = None) -> tuple:
    """The rules as Flax logical-axis rules ((logical, mesh axes | None), ...), for `nnx.logical_axis_rules` so
    that the model's activation constraints bind; mesh axes the mesh lacks are dropped."""
    out = []
    for name, target in normalize_rules(rules).items():
        if name in OPTIONS:
            continue
        axes = axes_of(target)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape)
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)


_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("pickstyle_axis_rules", default=None)


def active_rules() -> dict | None:
    """The rules `axis_rules` set for this context (None: the models follow DEFAULT_RULES)."""
    return _ACTIVE_RULES.get()


@contextlib.contextmanager
def axis_rules(rules):
    """Names the rules the models' own layout pins (`layers.layout`) follow instead of DEFAULT_RULES: a mapping
    logical axis -> mesh axis, a tuple of mesh axes or None, or a sequence of such pairs. A performance hint (the
    pins then match the caller's own shardings); correctness never depends on it. Usually entered through
    `rules_context`."""
    pairs = rules.items() if hasattr(rules, "items") else rules
    token = _ACTIVE_RULES.set({k: tuple(v) if isinstance(v, list) else v for k, v in pairs})
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def rules_context(mesh: Mesh, rules: Mapping = DEFAULT_RULES, *, inside_jit: bool = False):
    """An optional layout hint for tracing sharded model functions: the mesh, our rules for the models' own
    activation pins and weight gathers (`layers.layout`, which otherwise follows DEFAULT_RULES on the mesh the
    params live on), and Flax's copy of them (NNX resolves the parameters' logical metadata with it under a mesh).
    `inside_jit=True` (entering it inside a traced function) sets the abstract mesh instead of the concrete one.

    Correctness never depends on it: the models pin their layout with or without it (tests/test_sharded_model.py
    checks plain jits); with it the pins match weights sharded by `rules` and move no data. Strict rules (no
    allow_replicate) also make a forward refuse a tensor axis that does not divide the heads. jit caches traces
    without looking at the hint: trace one jitted function under one hint only.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if inside_jit else jax.set_mesh(mesh))
    stack.enter_context(axis_rules(normalize_rules(rules)))
    stack.enter_context(nnx.logical_axis_rules(flax_rules(rules, mesh)))
    return stack
