"""A model's layout: the sharding hooks its layers pin activations and weight gathers to (`layout`, `constrain`,
`gathered`), and attention over tokens that layout splits over devices (context parallelism: `self_attention` /
`cross_attention`, Ulysses or ring under shard_map). `layers` re-exports the public names (`layers.constrain`,
`layers.self_attention`, ...).

Dimension key: B batch, S query tokens, L text tokens, N heads, K head dim.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pickstyle_jax import sharding
from pickstyle_jax.models.attention import attention, online_init, online_update, query_blocks

f32 = jnp.float32
_SHARDED_OUT = ("heads", "mlp")  # kernel output axes whose sharding the layer's activations keep


# ------------------------------------------------------------------------------------------------- sharding hooks
#
# A model pins its own layout: each forward enters `layout(params, ...)` around its body, which reads the mesh from
# the arrays it was given (their types carry it, also inside jit), so the pins below hold under a plain jax.jit.
# They are what makes a sharded forward right, not a hint: without them XLA's SPMD partitioner (jax 0.10.2, Shardy
# and GSPMD) may lay a (data, fsdp)-split batch out in both device orders and mix the two up (a collective-permute
# between (0, 1) and (1, 0) that it never undoes) when a weight carries fsdp on a feature axis;
# tests/test_partitioner.py keeps the reproduction. With every weight gathered over its non-tensor axes where it
# is used (what FSDP means) and the activations pinned at every layer, fsdp only ever splits the batch.


class Layout(NamedTuple):
    """What `constrain` pins to: a mesh (concrete or abstract), normalised rules, and the logical axes made of
    whole units (e.g. {"heads": num_heads}: a head is never split across devices)."""
    mesh: Any
    rules: dict
    units: dict


_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("pickstyle_layout", default=None)


def mesh_of(tree):
    """The mesh the arrays of `tree` are laid out on (read from their types, so also from tracers), or None when
    they live on one device."""
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if mesh is None or mesh.empty:
            continue
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):  # eager: the concrete mesh
            mesh = getattr(leaf.sharding, "mesh", mesh)
        if math.prod(mesh.shape.values()) > 1:
            return mesh
    return None


@contextlib.contextmanager
def layout(arrays, units=()):
    """The layout a model's forward pins its activations and weight gathers to, entered by the forward itself.

    Mesh: the abstract mesh in context (`jax.set_mesh`, `sharding.rules_context`), else the one `arrays` (the
    parameters and inputs) live on; none (one device): every pin is a no-op. Rules: those of an enclosing
    `sharding.axis_rules` (a layout hint: the pins then match the caller's shardings and move no data), else
    sharding.DEFAULT_RULES. units: `sharding.Units` of the axes made of whole units (a model's heads); mesh axes
    that do not divide the count leave that axis replicated, or raise a ShardingError naming it under strict rules
    (no allow_replicate)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        mesh = mesh_of(arrays)
    explicit = [a for a, kind in zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ()))
                if kind == jax.sharding.AxisType.Explicit]
    if explicit:  # explicit axes type every reshape; the head and patch splits would fail deep inside the model
        raise sharding.ShardingError(f"the models run on meshes with Auto axes; mesh axes {explicit} are Explicit. "
                                     f"Build the mesh with sharding.make_mesh (or jax.make_mesh(..., axis_types="
                                     f"(jax.sharding.AxisType.Auto,) * n))")
    if mesh is None or math.prod(mesh.shape.values()) <= 1:
        token = _LAYOUT.set(None)
    else:
        rules = sharding.normalize_rules(sharding.active_rules() or sharding.DEFAULT_RULES)
        for unit in units:  # under strict rules a unit its mesh axes would split is a ShardingError
            if unit in rules:
                sharding.logical_to_spec((unit,), rules, mesh, name="the sharded forward")
        token = _LAYOUT.set(Layout(mesh, rules, {str(u): u.n_units for u in units}))
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def _spec(layout_, shape, axes):
    """PartitionSpec of `shape` under the layout: per dimension the longest prefix of its mesh axes that divides it
    (and its unit count), each mesh axis used once."""
    spec, used = [], set()
    for dim, name in zip(shape, axes):
        target = layout_.rules.get(name) if name is not None else None
        names = sharding.axes_of(target)
        names = [n for n in names if n in layout_.mesh.shape and n not in used]
        count = layout_.units.get(name)
        while names and (dim % math.prod(layout_.mesh.shape[n] for n in names) or
                         (count is not None and count % math.prod(layout_.mesh.shape[n] for n in names))):
            names.pop()
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else tuple(names))
    return jax.sharding.PartitionSpec(*spec)


def constrain(x, axes):
    """Sharding constraint on an activation by logical axis names, e.g. ("batch", "length", "embed"), to the layout
    of the enclosing model forward (`layout`); a no-op outside one or on one device. A dimension its mesh axes do
    not divide (a 3-sample CFG batch over 2 data shards) keeps the longest prefix of them that does, rather than
    failing mid-model."""
    layout_ = _LAYOUT.get()
    if layout_ is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(layout_.mesh, _spec(layout_, x.shape, axes)))


def constrain_rows(x, feature_axis):
    """`constrain` for a [batch, (length, ...) features] activation; 0-d / 1-d arrays pass through."""
    if x.ndim < 2:
        return x
    return constrain(x, ("batch",) + ("length",) * (x.ndim - 2) + (feature_axis,))


def constrain_output(y, kernel_axes):
    """Pin the output [batch, ..., out] of a dense layer with kernel axes (in, out): split by batch, and over heads /
    mlp where the kernel's output axis is."""
    return constrain_rows(y, kernel_axes[1] if kernel_axes[1] in _SHARDED_OUT else None)


def gathered(w, axes):
    """A parameter as a layer uses it: FSDP-gathered (every axis but heads / mlp replicated), tensor-parallel
    axes kept. A no-op outside a model's `layout`."""
    # first pinned to its stored (sharded) layout, so that the gather stays here: without that anchor XLA
    # propagates the gathered layout back into the scanned stack and gathers every layer up front
    w = constrain(w, axes)
    return constrain(w, tuple(a if a in _SHARDED_OUT else None for a in axes))


# ------------------------------------------------------------------------------------------------- context parallelism
#
# The rules may split the video tokens ("length") over mesh axes (DEFAULT_RULES: "context"). Everything per token
# (norms, dense layers, the FFN) then runs split as it is; cross-attention (`cross_attention`) runs each device's
# query block against the whole text under a shard_map; self-attention is the one place where every token meets
# every other, so it runs under a shard_map over the whole mesh (batch over the "batch" axes, heads over the "heads"
# axes as before, tokens over the "length" axes) and moves data itself:
#   "ulysses"  all-to-all from token-split [B, S/c, N, K] to head-split [B, S, N/c, K], the local kernel
#              (`attention`: chunked, cudnn or splash, whatever `implementation` resolves to), all-to-all back.
#              Needs c to divide the heads each device holds (num_heads / tensor).
#   "ring"     each device keeps its query block and passes its key/value block around the ring (ppermute), c
#              steps of the online-softmax recurrence (`attention.online_update`; queries in blocks of chunk_size,
#              keys in blocks of kv_chunk_size); any head count; XLA einsums, not the fused kernels.
#   "auto"     ulysses where the heads divide, else ring.

CONTEXT_PARALLEL = ("auto", "ulysses", "ring")


def context_shards() -> int:
    """How many devices the enclosing model layout splits the video tokens over (the product of the mesh axes the
    "length" rule names; 1 outside a layout or without such axes). A forward pads its tokens to a multiple of it."""
    layout_ = _LAYOUT.get()
    if layout_ is None:
        return 1
    return math.prod(layout_.mesh.shape[n] for n in sharding.axes_of(layout_.rules.get("length")) if n in layout_.mesh.shape)


def self_attention(q_BSNK, k_BSNK, v_BSNK, *, kv_len=None, context_parallel="auto", implementation="xla",
                   scale=None, chunk_size=1024, kv_chunk_size=None, block_q=512, block_kv=512):
    """`attention` of a token sequence with itself, where the enclosing layout may split the tokens over devices.

    q, k, v [B, S, N, K]; kv_len: the number of real tokens (static int; keys at positions >= kv_len are padding
    and are never attended to), None = all S. Without a layout whose "length" rule splits S, this is `attention`.
    With one, it runs under a shard_map over the whole mesh, by `context_parallel` ("auto" | "ulysses" | "ring",
    see the section comment); the rest are `attention`'s kernel arguments. The result equals the unsplit one.
    """
    if context_parallel not in CONTEXT_PARALLEL:
        raise ValueError(f"context_parallel must be one of {CONTEXT_PARALLEL}, got {context_parallel!r}")
    b, s, n, _ = q_BSNK.shape
    kernel = dict(implementation=implementation, scale=scale, chunk_size=chunk_size, kv_chunk_size=kv_chunk_size,
                  block_q=block_q, block_kv=block_kv)
    kv_len = None if kv_len is None or kv_len >= s else int(kv_len)
    layout_ = _LAYOUT.get()
    spec = None if layout_ is None else _spec(layout_, q_BSNK.shape, ("batch", "length", "heads", None))
    ctx_axes = () if spec is None else sharding.axes_of(spec[1])
    if not ctx_axes:
        lens = None if kv_len is None else jnp.full((b,), kv_len, jnp.int32)
        return attention(q_BSNK, k_BSNK, v_BSNK, kv_lens=lens, **kernel)
    mesh = layout_.mesh
    c = math.prod(mesh.shape[a] for a in ctx_axes)
    local_heads = n // math.prod(mesh.shape[a] for a in sharding.axes_of(spec[2]))
    mode = context_parallel
    if mode == "auto":
        mode = "ulysses" if local_heads % c == 0 else "ring"
    if mode == "ulysses" and local_heads % c:
        raise sharding.ShardingError(
            f"context_parallel='ulysses' splits each device's {local_heads} heads (num_heads {n} / heads axes "
            f"{sharding.axes_of(spec[2]) or '()'}) over the {c} devices of mesh axes {ctx_axes}, which do not divide them: "
            f"pick a mesh whose tensor x context size divides num_heads, or set Options(context_parallel='ring')")
    if mode == "ulysses":
        body = functools.partial(_ulysses, axes=ctx_axes, kv_len=kv_len, kernel=kernel)
    else:
        body = functools.partial(_ring, axes=ctx_axes, n_shards=c, kv_len=kv_len, scale=scale,
                                 q_chunk=chunk_size, kv_chunk=kv_chunk_size)
    # check_vma=False: the Pallas and cuDNN calls inside declare no varying-manual-axes types (see splash.py);
    # the transpose then divides and psums the cotangents of axes a spec leaves out, which is still exact
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        q_BSNK, k_BSNK, v_BSNK)


def cross_attention(q_BSNK, k_BLNK, v_BLNK, *, key_bias=None, **kernel):
    """`attention` of queries the enclosing layout may split over devices ("length") against keys every device holds
    whole (the text): local per query block, so under a shard_map (batch, tokens and heads split as the layout says,
    keys and key_bias [B, L] whole) no device computes another's queries. `kernel`: `attention`'s arguments."""
    layout_ = _LAYOUT.get()
    spec = None if layout_ is None else _spec(layout_, q_BSNK.shape, ("batch", "length", "heads", None))
    if spec is None or not sharding.axes_of(spec[1]):
        return attention(q_BSNK, k_BLNK, v_BLNK, key_bias=key_bias, **kernel)
    kv_spec = jax.sharding.PartitionSpec(spec[0], None, spec[2], None)
    body = lambda q, k, v, bias: attention(q, k, v, key_bias=bias, **kernel)
    if key_bias is None:
        return jax.shard_map(lambda q, k, v: body(q, k, v, None), mesh=layout_.mesh, in_specs=(spec, kv_spec, kv_spec),
                             out_specs=spec, check_vma=False)(q_BSNK, k_BLNK, v_BLNK)
    bias_BL = jnp.broadcast_to(jnp.asarray(key_bias, f32), (q_BSNK.shape[0], k_BLNK.shape[1]))
    bias_spec = jax.sharding.PartitionSpec(spec[0])
    return jax.shard_map(body, mesh=layout_.mesh, in_specs=(spec, kv_spec, kv_spec, bias_spec), out_specs=spec,
                         check_vma=False)(q_BSNK, k_BLNK, v_BLNK, bias_BL)


def _ulysses(q_BSNK, k_BSNK, v_BSNK, *, axes, kv_len, kernel):
    """Per device: [b, S/c, n, K] blocks -> all-to-all -> [b, S, n/c, K], attention, and back."""
    to_heads = lambda a: jax.lax.all_to_all(a, axes, split_axis=2, concat_axis=1, tiled=True)
    q, k, v = (to_heads(a) for a in (q_BSNK, k_BSNK, v_BSNK))
    lens = None if kv_len is None else jnp.full((q.shape[0],), kv_len, jnp.int32)
    out = attention(q, k, v, kv_lens=lens, **kernel)
    return jax.lax.all_to_all(out, axes, split_axis=1, concat_axis=2, tiled=True)


def _ring(q_BSNK, k_BSNK, v_BSNK, *, axes, n_shards, kv_len, scale, q_chunk, kv_chunk):
    """Per device: its query block against every key/value block in turn, each passed on to the next device by
    ppermute after use; the online-softmax state carries across the c steps. Keys beyond kv_len are masked by their
    global position, so padding is exact whatever block it falls in. Within a step the device's queries go in equal
    blocks of at most q_chunk (`query_blocks`) and its keys in blocks of kv_chunk, so at most [B, N, q_chunk,
    kv_chunk] logits live at once (as in "chunked" attention; every query row's recurrence is the same)."""
    b, s_loc, n, kd = q_BSNK.shape
    scale = 1.0 / math.sqrt(kd) if scale is None else scale
    q = q_BSNK if scale == 1.0 else (q_BSNK.astype(f32) * scale).astype(q_BSNK.dtype)
    q_BNSK, k_BNTK, v_BNTK = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q, k_BSNK, v_BSNK))
    n_q, q_blk = query_blocks(s_loc, q_chunk or s_loc)
    q_QBNSK = jnp.moveaxis(jnp.pad(q_BNSK, ((0, 0), (0, 0), (0, n_q * q_blk - s_loc), (0, 0)))
                           .reshape(b, n, n_q, q_blk, kd), 2, 0)
    me = jax.lax.axis_index(axes)
    ring = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    chunk = min(kv_chunk or s_loc, s_loc)

    def step(carry, i):
        state, k_blk, v_blk = carry
        owner = (me - i) % n_shards  # the device whose keys are here at step i
        bias_BT = None
        if kv_len is not None:
            pos_T = owner * s_loc + jnp.arange(s_loc)
            bias_BT = jnp.broadcast_to(jnp.where(pos_T < kv_len, 0.0, -jnp.inf).astype(f32), (b, s_loc))
        one_block = jax.checkpoint(lambda st, q_c: online_update(st, q_c, k_blk, v_blk, bias_BT, chunk))
        state = jax.lax.map(lambda xs: one_block(*xs), (state, q_QBNSK))
        k_blk, v_blk = (jax.lax.ppermute(a, axes, ring) for a in (k_blk, v_blk))
        return (state, k_blk, v_blk), None

    init = jax.vmap(online_init)(q_QBNSK)
    (acc, _, denom), _, _ = jax.lax.scan(step, (init, k_BNTK, v_BNTK), jnp.arange(n_shards))[0]
    out_BNSK = jnp.moveaxis(acc / denom, 0, 2).reshape(b, n, n_q * q_blk, kd)[:, :, :s_loc]
    return jnp.transpose(out_BNSK, (0, 2, 1, 3)).astype(q_BSNK.dtype)
