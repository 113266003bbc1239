"""Pallas TPU splash attention behind the same [B, S, N, K] interface as `layers.attention`.

Dimension key: B batch, S query tokens, T key/value tokens, N query heads, M key/value heads (N % M == 0:
grouped-query attention comes free with the kernel), K head dim.

JAX's splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) is a flash-attention kernel for one
example: q [N, S, K], k and v [M, T, K], S and T multiples of its block sizes. This wrapper adds what the models
need and the kernel leaves out:

- the batch dimension, by `jax.vmap` over the kernel (Pallas calls batch into a larger grid);
- any S and T: both are zero-padded up to a multiple of their block (a 21x60x104 latent clip is 32,760 tokens,
  not a multiple of 128). Padded queries are sliced off the output; padded keys are masked through the
  kernel's segment ids (keys of segment 1 are invisible to queries of segment 0), which also carries
  per-sample `kv_lens`, a runtime value a static mask could not hold;
- the softmax scale, which the kernel does not take: it is folded into q (in fp32, before the cast back);
- interpret mode off TPU, so CPU tests check the very kernel the TPU runs, forward and backward. The choice
  is made per lowering platform (`lax.platform_dependent`), so a TPU export from a CPU host gets the compiled
  kernel;
- `shard_map` over the mesh (given, or the ambient `jax.set_mesh` one): XLA's partitioner cannot split a
  Mosaic custom call, so a sharded caller must hand it per-device blocks. Attention is independent per example
  and per head, so batch and head sharding need no communication; the sequence stays whole.

Every query keeps at least one visible key as long as kv_lens >= 1 (padded queries are in segment 0 too,
so they see the real keys): no softmax row is empty, and no NaN reaches the gradient of the sliced rows.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import NamedSharding, PartitionSpec as P

LANES = 128  # the kernel's blocks tile TPU vregs: multiples of 128 along both sequence axes
DTYPES = (jnp.float32, jnp.bfloat16)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(requested: int, length: int) -> int:
    """The block actually used: as asked, but never larger than the (128-rounded) sequence, so a short
    sequence is not padded up to a full 512 block."""
    return min(requested, _round_up(length, LANES))


def _kernel(n_heads: int, s_pad: int, t_pad: int, bq: int, bkv: int, interpret: bool):
    """The splash kernel for one padded problem size.

    Built afresh at each trace, never cached here: it holds its block-mask tables as jnp arrays, which are
    tracers when made under jit (the numpy mask processing behind them is cached by JAX). The mask is full: all
    masking is done by segment ids, which are runtime arrays. Backward block sizes are set equal to the forward
    ones (the kernel has no gradient without them).
    """
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                          block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                          block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((s_pad, t_pad)) for _ in range(n_heads)])
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _check(q, k, v, kv_lens, block_q, block_kv):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"splash attention takes q [B, S, N, K], k and v [B, T, M, K]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"splash attention needs k and v of one shape, got k {k.shape}, v {v.shape}")
    (b, _, n, kd), (bk, _, m, kdk) = q.shape, k.shape
    if bk != b or kdk != kd:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch and head dim")
    if n % m:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({m})")
    if q.dtype != k.dtype or q.dtype != v.dtype or not any(q.dtype == d for d in DTYPES):
        raise ValueError(f"splash attention takes q, k, v all float32 or all bfloat16, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(blk, int) or blk <= 0 or blk % LANES:
            raise ValueError(f"splash {name} must be a positive multiple of {LANES}, got {blk!r}")
    if kv_lens is not None and jnp.shape(kv_lens) != (b,):
        raise ValueError(f"kv_lens must have shape [B] = ({b},), got {jnp.shape(kv_lens)}")


def _attend(q_BSNK, k_BTMK, v_BTMK, kv_lens_B, *, block_q, block_kv, interpret):
    """Unsharded core: pad, transpose head-major, vmap the kernel over the batch, undo."""
    (_, s, n, _), (_, t, m, _) = q_BSNK.shape, k_BTMK.shape
    bq, bkv = _block(block_q, s), _block(block_kv, t)
    s_pad, t_pad = _round_up(s, bq), _round_up(t, bkv)
    pad = lambda a, to: jnp.pad(a, ((0, 0), (0, to - a.shape[1]), (0, 0), (0, 0)))
    q_BNSK = jnp.transpose(pad(q_BSNK, s_pad), (0, 2, 1, 3))
    k_BMTK = jnp.transpose(pad(k_BTMK, t_pad), (0, 2, 1, 3))
    v_BMTK = jnp.transpose(pad(v_BTMK, t_pad), (0, 2, 1, 3))
    kernel = _kernel(n, s_pad, t_pad, bq, bkv, interpret)
    if kv_lens_B is None and t_pad == t:  # nothing to mask: the kernel's segment-free variant
        out_BNSK = jax.vmap(kernel)(q_BNSK, k_BMTK, v_BMTK)
    else:
        lens_B = jnp.full(q_BSNK.shape[:1], t, jnp.int32) if kv_lens_B is None else kv_lens_B.astype(jnp.int32)
        seg_q = jnp.zeros(q_BNSK.shape[:1] + (s_pad,), jnp.int32)
        seg_kv = (jnp.arange(t_pad)[None, :] >= jnp.minimum(lens_B, t)[:, None]).astype(jnp.int32)
        out_BNSK = jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=sa.SegmentIds(sq, skv)))(
            q_BNSK, k_BMTK, v_BMTK, seg_q, seg_kv)
    return jnp.transpose(out_BNSK, (0, 2, 1, 3))[:, :s]


def _attend_on(q, k, v, lens, *, interpret, **blocks):
    """`_attend`, in interpret mode or not; None decides by the platform being lowered for, not the process's
    default backend, so `jax.export(..., platforms=("tpu",))` on a CPU host gets the real Mosaic kernel while
    the same function jitted on CPU interprets (only the branch of the target platform is lowered)."""
    if interpret is not None:
        return _attend(q, k, v, lens, interpret=bool(interpret), **blocks)
    return jax.lax.platform_dependent(q, k, v, lens, tpu=functools.partial(_attend, interpret=False, **blocks),
                                      default=functools.partial(_attend, interpret=True, **blocks))


def attention(q_BSNK, k_BTNK, v_BTNK, *, kv_lens=None, scale=None, key_bias=None, block_q=512, block_kv=512,
              interpret=None, mesh=None, batch_axes=None, head_axes=None):
    """softmax(scale * q k^T) v with the Pallas TPU splash kernel; returns [B, S, N, K] in q's dtype.

    q [B, S, N, K], k and v [B, T, M, K] with N a multiple of M; all float32 or all bfloat16. Any S and T.
    kv_lens: optional int [B]; keys at positions >= kv_lens[b] are masked out. Each must be >= 1 (a row with no
      visible key has no softmax); this is not checked, as kv_lens may be traced.
    scale: defaults to 1/sqrt(K); applied to q in fp32 before the kernel.
    key_bias: not supported (the kernel adds no bias to its logits); passing one is an error.
    block_q, block_kv: kernel tiles along S and T, multiples of 128 (shrunk to the padded length for short
      sequences). They trade VMEM for fewer grid steps; the result does not depend on them.
    interpret: run the kernel in Pallas interpret mode (slow; how CPU tests check it). None: the compiled Mosaic
      kernel when lowering for TPU, interpret mode for any other platform.
    mesh, batch_axes, head_axes: where the kernel runs under shard_map, B split over `batch_axes` and heads over
      `head_axes` (mesh axis names; sequence and head dim stay whole on each device). `mesh` defaults to the
      ambient one (`jax.set_mesh`); with neither, or inside a shard_map over all its axes, the kernel is called
      directly. Axes default to what the active Flax logical-axis rules map "batch" and "heads" to (left out
      where they do not divide the array, which then is replicated over them; no rules: all replicated);
      given explicitly, they must divide.
    """
    if key_bias is not None:
        raise ValueError("splash attention takes no key_bias: mask padded keys with kv_lens, or use the 'xla' or "
                         "'chunked' attention implementation")
    _check(q_BSNK, k_BTNK, v_BTNK, kv_lens, block_q, block_kv)
    out_dtype = q_BSNK.dtype
    scale = 1.0 / math.sqrt(q_BSNK.shape[-1]) if scale is None else scale
    if scale != 1.0:
        q_BSNK = (q_BSNK.astype(jnp.float32) * scale).astype(out_dtype)
    core = functools.partial(_attend_on, block_q=block_q, block_kv=block_kv, interpret=interpret)
    lens = None if kv_lens is None else jnp.asarray(kv_lens)

    explicit = mesh is not None
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    free = tuple(a for a in mesh.axis_names if a not in getattr(mesh, "manual_axes", ()))
    if not free:
        if batch_axes is not None or head_axes is not None:
            raise ValueError("splash attention: batch_axes / head_axes need a mesh (pass mesh= or use jax.set_mesh)")
        return core(q_BSNK, k_BTNK, v_BTNK, lens).astype(out_dtype)

    n_kv = k_BTNK.shape[2]
    batch = _axes(mesh, free, batch_axes, "batch", q_BSNK.shape[0], "batch_axes", explicit or batch_axes is not None)
    heads = _axes(mesh, free, head_axes, "heads", n_kv, "head_axes (over key/value heads)",
                  explicit or head_axes is not None)
    qkv_spec = P(batch, None, heads, None)
    if any(t == jax.sharding.AxisType.Explicit for a, t in zip(mesh.axis_names, mesh.axis_types) if a in free):
        # explicit-sharding axes: shard_map takes inputs only already laid out as its in_specs say
        q_BSNK, k_BTNK, v_BTNK = (jax.reshard(a, NamedSharding(mesh, qkv_spec)) for a in (q_BSNK, k_BTNK, v_BTNK))
        lens = None if lens is None else jax.reshard(lens, NamedSharding(mesh, P(batch)))
    # check_vma=False: the kernel's pallas_call declares its outputs without the varying-manual-axes type that
    # shard_map's checker asks of every value in jax 0.10 (a ValueError otherwise).
    if lens is None:
        fn = jax.shard_map(lambda q, k, v: core(q, k, v, None), mesh=mesh, in_specs=(qkv_spec,) * 3,
                           out_specs=qkv_spec, check_vma=False)
        return fn(q_BSNK, k_BTNK, v_BTNK).astype(out_dtype)
    fn = jax.shard_map(core, mesh=mesh, in_specs=(qkv_spec,) * 3 + (P(batch),), out_specs=qkv_spec,
                       check_vma=False)
    return fn(q_BSNK, k_BTNK, v_BTNK, lens).astype(out_dtype)


def _axes(mesh, free, given, logical, dim, what, strict):
    """Mesh axes splitting one dimension of size `dim`: as given (must divide), else from the Flax rules."""
    if given is None:
        if strict:
            return None
        from flax import linen as nn  # lazily: only the ambient-mesh path reads Flax's logical-axis rules

        given = nn.logical_to_mesh_axes((logical,))[0]
    names = (given,) if isinstance(given, str) else tuple(given or ())
    unknown = [a for a in names if a not in mesh.axis_names]
    if strict and unknown:
        raise ValueError(f"splash attention: {what} {given!r} names axes {unknown} not in mesh {mesh.axis_names}")
    names = tuple(a for a in names if a in free)
    if strict:
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            raise ValueError(f"splash attention: {what}={given!r} splits a dimension of {dim} over {size} devices, "
                             f"which does not divide it")
    else:  # a rule is a preference: keep the longest prefix of its axes that divides (the rest replicate)
        while names and dim % math.prod(mesh.shape[a] for a in names):
            names = names[:-1]
    return names or None
