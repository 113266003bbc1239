"""Primitives shared by the models: dense, norms, timestep sinusoid, 3D RoPE and the Flax NNX glue; the models reach
attention and the sharding hooks through here too.

Dimension key: B batch, S query tokens, T key tokens, N heads, K head dim, C features.

Attention kernels (`attention`, `resolve_attention`, `query_blocks`) live in `models/attention.py`; the sharding
hooks a model pins its layout with (`layout`, `constrain`, `gathered`, ...) and attention over tokens a mesh may
split (context parallelism: `self_attention` / `cross_attention`, Ulysses or ring under shard_map) in
`models/layout.py`. This module re-exports their public names, so `layers.attention` and `layers.self_attention`
are what callers use.

Precision rules (PICKSTYLE.md §2.6): matmuls take inputs in the compute dtype and accumulate in fp32
(`preferred_element_type`); norm statistics, softmax statistics and RoPE run in fp32 whatever the compute dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pickstyle_jax.models.attention import ATTENTION_IMPLEMENTATIONS, attention, query_blocks, resolve_attention
from pickstyle_jax.models.layout import (CONTEXT_PARALLEL, Layout, constrain, constrain_output, constrain_rows,
                                         context_shards, cross_attention, gathered, layout, mesh_of, self_attention)

__all__ = ["ATTENTION_IMPLEMENTATIONS", "CONTEXT_PARALLEL", "Dense", "LayerNorm", "Layout", "RMSNorm",
           "abstract_params", "apply_rope", "attention", "bind", "constrain", "constrain_output", "constrain_rows",
           "context_shards",
           "cross_attention", "dense", "gathered", "gelu_tanh", "init_params", "layer_norm", "layout", "logical_axes",
           "mesh_of", "normal", "param", "query_blocks", "resolve_attention", "rms_norm", "rope_freqs", "rope_split",
           "rope_tables", "self_attention", "timestep_embedding", "xavier_uniform", "zeros"]

f32 = jnp.float32


def dense(x, p, *, dtype=f32, out_dtype=None, adapter=None, scale=1.0):
    """y = x @ kernel + bias with inputs cast to `dtype`, fp32 accumulation, bias added in fp32.

    adapter: optional LoRA {"A": [in, r], "B": [r, out]}; adds scale * (x @ A) @ B, never forming A @ B (the
    rank-r detour costs r / out of the main matmul). Its matmuls also take `dtype` inputs and accumulate in fp32.
    """
    x = x.astype(dtype)
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(dtype), preferred_element_type=f32)
    if "bias" in p:
        y = y + p["bias"].astype(f32)
    if adapter is not None:
        down = jnp.einsum("...i,ir->...r", x, adapter["A"].astype(dtype), preferred_element_type=f32)
        down = constrain_rows(down, None)
        up = jnp.einsum("...r,ro->...o", down.astype(dtype), adapter["B"].astype(dtype), preferred_element_type=f32)
        y = y + scale * up
    return y.astype(out_dtype or dtype)


def layer_norm(x, p=None, *, eps=1e-6):
    """LayerNorm over the last axis in fp32; affine when `p` ({"scale", "bias"}) is given. Returns fp32."""
    x = x.astype(f32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + eps)
    if p is not None:
        y = y * p["scale"].astype(f32) + p["bias"].astype(f32)
    return y


def rms_norm(x, p, *, eps=1e-6):
    """RMSNorm over the last axis with fp32 statistics and a learned scale. Returns fp32."""
    x = x.astype(f32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return y * p["scale"].astype(f32)


def gelu_tanh(x):
    """tanh-approximate GELU evaluated in fp32, returned in the input dtype."""
    return jax.nn.gelu(x.astype(f32), approximate=True).astype(x.dtype)


def _split_mantissa(a, bits):
    """float64 array -> (hi, lo) float32 with hi keeping `bits` significant bits, so hi * (small int) is exact."""
    m, e = np.frexp(a)
    hi = np.ldexp(np.floor(m * 2.0**bits) / 2.0**bits, e)
    return hi.astype(np.float32), (a - hi).astype(np.float32)


_TWO_PI_HI, _TWO_PI_LO = _split_mantissa(np.float64(2 * np.pi), 16)


def timestep_embedding(t_B, dim, *, max_period=10000.0):
    """Sinusoid [cos(t*w) | sin(t*w)], w_i = max_period^(-i/(dim/2)): cos half first. Returns [B, dim] fp32.

    The reference evaluates this in float64. Plain fp32 loses ~3e-5 at t = 999 because t*w itself is rounded;
    here t*w is split into an exactly representable part (t on a 1/16 grid times w with 10 significant bits,
    exact for t < 1024), reduced modulo 2*pi with a two-word constant, plus a small correction, which keeps the
    error near 2e-7 for t in [0, 1000] (tests/test_wan.py measures it against float64).
    """
    half = dim // 2
    omega = max_period ** (-np.arange(half, dtype=np.float64) / half)
    omega_hi, omega_lo = _split_mantissa(omega, 10)
    t = jnp.asarray(t_B, f32)[:, None]
    t_hi = jnp.floor(t * 16.0) / 16.0  # exact: at most 14 significant bits for t < 1024
    t_lo = t - t_hi  # exact
    exact = t_hi * omega_hi  # exact product (<= 24 significant bits)
    turns = jnp.round(exact / _TWO_PI_HI)
    reduced = (exact - turns * _TWO_PI_HI) - turns * _TWO_PI_LO  # first subtraction is exact (Sterbenz)
    theta = reduced + (t_hi * omega_lo + t_lo * omega.astype(np.float32))
    return jnp.concatenate([jnp.cos(theta), jnp.sin(theta)], axis=-1)


def rope_split(head_dim):
    """Per-head lane split (frame, row, column) of the 3D RoPE: d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_freqs(head_dim, grid, *, theta=10000.0):
    """cos/sin tables [S, K/2] (fp32) of the 3D RoPE for a (frames, rows, columns) token grid, frame-major.

    Pair p of a head rotates by pos_axis * theta^(-2k/d_axis), each axis with its own base dimension d_axis
    (PICKSTYLE.md §2.5). The angles are built on the host in float64 from the static grid and rounded once,
    like the reference, so the tables equal the float64 ones rounded to fp32.
    """
    tables = []
    for axis, (size, d_axis) in enumerate(zip(grid, rope_split(head_dim))):
        freqs = 1.0 / theta ** (np.arange(0, d_axis, 2, dtype=np.float64) / d_axis)
        angle = np.outer(np.arange(size, dtype=np.float64), freqs)  # [size, d_axis/2]
        shape = [1, 1, 1, d_axis // 2]
        shape[axis] = size
        tables.append(angle.reshape(shape))
    angle_FHWP = np.concatenate([np.broadcast_to(a, (*grid, a.shape[-1])) for a in tables], axis=-1)
    angle_SP = angle_FHWP.reshape(-1, head_dim // 2)
    return np.cos(angle_SP).astype(np.float32), np.sin(angle_SP).astype(np.float32)


def rope_tables(head_dim, grid, *, theta=10000.0):
    """(cos, sin) fp32 device arrays shaped [1, S, 1, K/2] for `apply_rope`: convert once per forward and reuse
    them in every block (a host table passed to each block is embedded, and broadcast, once per block)."""
    return tuple(jnp.asarray(a)[None, :, None, :] for a in rope_freqs(head_dim, grid, theta=theta))


def apply_rope(x_BSNK, cos_SP, sin_SP):
    """Rotate adjacent lane pairs (2p, 2p+1) by the table angles, in fp32. Returns fp32 [B, S, N, K].

    The tables are [S, K/2] (`rope_freqs`) or already shaped [1, S, 1, K/2] (`rope_tables`)."""
    x = x_BSNK.astype(f32).reshape(*x_BSNK.shape[:-1], -1, 2)
    a, b = x[..., 0], x[..., 1]
    cos, sin = (t if jnp.ndim(t) == 4 else jnp.asarray(t)[None, :, None, :] for t in (cos_SP, sin_SP))
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x_BSNK.shape)


# ------------------------------------------------------------------------------------------------- Flax NNX glue
#
# Models are Flax NNX modules whose attribute names mirror the official PyTorch keys (repeated blocks live in an
# nnx.Dict keyed "0", "1", ...). Outside jit everything is a plain nested dict of arrays (the "pure dict" of the
# module's state); inside, `bind` merges the cached graph definition with those arrays into a module to call.
# No module object ever crosses a jit boundary.


def param(value, axes):
    """An nnx.Param carrying its logical axis names (read by the sharding rules); never sharded eagerly."""
    axes = tuple(axes)
    if len(axes) != jnp.ndim(value):
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {jnp.shape(value)}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


@functools.lru_cache(maxsize=64)
def _split_abstract(build, cfg):
    """(graphdef, abstract state) of `build(cfg, rngs=...)`, built once per (module class, config)."""
    return nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))


def _paths(tree):
    return {tuple(str(getattr(k, "key", k)) for k in kp): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_params(build, cfg, rng) -> dict:
    """Plain nested dict of a freshly initialised `build(cfg, rngs=...)` (jit-able; shapes from the config)."""
    return nnx.to_pure_dict(nnx.state(build(cfg, rngs=nnx.Rngs(rng))))


def abstract_params(build, cfg) -> dict:
    """Same tree as `init_params`, leaves jax.ShapeDtypeStruct; nothing allocated."""
    return nnx.to_pure_dict(_split_abstract(build, cfg)[1])


def logical_axes(build, cfg, units=()) -> dict:
    """Same tree as `init_params`, leaves the parameters' logical axis names (tuples of str | None); each name of
    `units` (`sharding.Units`, e.g. a model's heads) replaces its plain name, so the rules also check its count."""
    by_name = {str(u): u for u in units}
    state = _split_abstract(build, cfg)[1]
    return nnx.to_pure_dict(jax.tree.map(
        lambda v: tuple(by_name.get(a, a) for a in (v.get_metadata().get("out_sharding") or (None,) * v.value.ndim)),
        state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def bind(build, cfg, params):
    """The module `build(cfg)` holding `params` (a plain dict with exactly the module's paths and shapes)."""
    graphdef, abstract = _split_abstract(build, cfg)
    want, got = _paths(nnx.to_pure_dict(abstract)), _paths(params)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = [(".".join(p), tuple(got[p].shape), tuple(want[p].shape)) for p in sorted(set(want) & set(got))
              if tuple(jnp.shape(got[p])) != tuple(want[p].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"params do not fit {build.__name__}({type(cfg).__name__}): missing "
                         f"{['.'.join(p) for p in missing][:20]}, unexpected {['.'.join(p) for p in unexpected][:20]}, "
                         f"mis-shaped (path, given, expected) {shapes[:20]}")
    state = jax.tree.map(lambda v: v, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------- NNX primitives


def xavier_uniform(key, shape):
    """U(+-sqrt(6 / (fan_in + fan_out))) for an [in, out] kernel (torch's xavier_uniform_), fp32."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return jax.random.uniform(key, shape, f32, -bound, bound)


def normal(std):
    return lambda key, shape: std * jax.random.normal(key, shape, f32)


def zeros(key, shape):
    del key
    return jnp.zeros(shape, f32)




class Dense(nnx.Module):
    """Dense layer {kernel [in, out], bias [out]} computed by `dense`; LoRA enters as an optional adapter dict.

    axes: logical names of the kernel's (in, out) axes; the bias takes the output one.
    kernel_init(key, shape) -> fp32 array; parameters are stored in `param_dtype`, the bias starts at zero.
    """

    def __init__(self, n_in, n_out, axes, *, rngs, kernel_init=xavier_uniform, param_dtype=f32, use_bias=True):
        self.kernel = param(kernel_init(rngs.params(), (n_in, n_out)).astype(param_dtype), axes)
        self.axes = tuple(axes)
        self.bias = param(jnp.zeros((n_out,), param_dtype), axes[1:]) if use_bias else None

    def as_dict(self) -> dict:
        p = {"kernel": gathered(self.kernel[...], self.axes)}
        if self.bias is not None:
            p["bias"] = gathered(self.bias[...], self.axes[1:])
        return p

    def __call__(self, x, *, dtype=f32, out_dtype=None, adapter=None, lora_scale=1.0):
        if adapter is not None:  # A [in, r] and B [r, out] follow the kernel's in and out axes
            adapter = {"A": gathered(adapter["A"], (self.axes[0], None)),
                       "B": gathered(adapter["B"], (None, self.axes[1]))}
        y = dense(x, self.as_dict(), dtype=dtype, out_dtype=out_dtype, adapter=adapter, scale=lora_scale)
        return constrain_output(y, self.axes)


class LayerNorm(nnx.Module):
    """Affine LayerNorm {scale, bias} over the last axis; fp32 statistics and output."""

    def __init__(self, dim, axes=("embed",), *, eps=1e-6, param_dtype=f32):
        self.scale = param(jnp.ones((dim,), param_dtype), axes)
        self.bias = param(jnp.zeros((dim,), param_dtype), axes)
        self.axes, self.eps = tuple(axes), eps

    def __call__(self, x):
        return layer_norm(x, {"scale": gathered(self.scale[...], self.axes),
                              "bias": gathered(self.bias[...], self.axes)}, eps=self.eps)


class RMSNorm(nnx.Module):
    """RMSNorm {scale} over the last axis; fp32 statistics and output."""

    def __init__(self, dim, axes=("embed",), *, eps=1e-6, param_dtype=f32):
        self.scale = param(jnp.ones((dim,), param_dtype), axes)
        self.axes, self.eps = tuple(axes), eps

    def __call__(self, x):
        return rms_norm(x, {"scale": gathered(self.scale[...], self.axes)}, eps=self.eps)
