"""Primitives shared by the models: dense, norms, timestep sinusoid, 3D RoPE, attention, and the Flax NNX glue.

Dimension key: B batch, S query tokens, T key tokens, N heads, K head dim, C features.

Attention over tokens a mesh may split (context parallelism: Ulysses or ring under shard_map) is
`self_attention` / `cross_attention`, at the end of this file with the other sharding hooks.

Precision rules (PICKSTYLE.md §2.6): matmuls take inputs in the compute dtype and accumulate in fp32
(`preferred_element_type`); norm statistics, softmax statistics and RoPE run in fp32 whatever the compute dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pickstyle_jax import sharding

f32 = jnp.float32

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "splash")
_HALF = (jnp.bfloat16, jnp.float16)


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
        down = _constrain_rows(down, None)
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


# ------------------------------------------------------------------------------------------------- attention


def _key_bias(b, t, kv_lens_B, key_bias):
    """Additive fp32 logit bias [B, T] from key lengths (-inf beyond) and a per-key bias, or None."""
    if kv_lens_B is None and key_bias is None:
        return None
    bias_BT = jnp.broadcast_to(jnp.asarray(0.0 if key_bias is None else key_bias, f32), (b, t))
    if kv_lens_B is not None:
        bias_BT = jnp.where(jnp.arange(t)[None, :] < kv_lens_B[:, None], bias_BT, -jnp.inf)
    return bias_BT


def _attend(q_BNSK, k_BNTK, v_BNTK, bias_BT):
    """Exact softmax attention on head-major, pre-scaled q; fp32 logits and statistics, normalised after the
    value product (one pass fewer over the [S, T] weights). Returns fp32 [B, N, S, K]."""
    logits_BNST = jnp.einsum("bnsk,bntk->bnst", q_BNSK, k_BNTK, preferred_element_type=f32)
    if bias_BT is not None:
        logits_BNST = logits_BNST + bias_BT[:, None, None, :]
    weights_BNST = jnp.exp(logits_BNST - jnp.max(logits_BNST, axis=-1, keepdims=True))
    denom_BNS1 = jnp.sum(weights_BNST, axis=-1, keepdims=True)
    out_BNSK = jnp.einsum("bnst,bntk->bnsk", weights_BNST.astype(v_BNTK.dtype), v_BNTK, preferred_element_type=f32)
    return out_BNSK / denom_BNS1


def _attend_online(q_BNSK, k_BNTK, v_BNTK, bias_BT, kv_chunk):
    """Key-chunked online softmax (flash-attention recurrence); never holds more than [B, N, S, kv_chunk].

    Each key step is rematerialised: its backward recomputes the [B, N, S, kv_chunk] logits from the carry
    instead of saving them for every key chunk (which cost 10 x 5 GiB per device in the 14B plan)."""
    acc, _, denom = _online(_online_init(q_BNSK), q_BNSK, k_BNTK, v_BNTK, bias_BT, kv_chunk)
    return acc / denom


def _online_init(q_BNSK):
    """The empty state (acc [B, N, S, K], row max [B, N, S, 1], denominator [B, N, S, 1]) of `_online`."""
    b, n, s, kd = q_BNSK.shape
    return jnp.zeros((b, n, s, kd), f32), jnp.full((b, n, s, 1), -jnp.inf, f32), jnp.zeros((b, n, s, 1), f32)


def _online(carry, q_BNSK, k_BNTK, v_BNTK, bias_BT, kv_chunk):
    """The online-softmax state after also attending to keys k/v (with bias [B, T] or None) in blocks of kv_chunk:
    the recurrence of `_attend_online`, and of ring attention's steps (one key block per device)."""
    b, n, _, kd = q_BNSK.shape
    t = k_BNTK.shape[2]
    n_chunks = -(-t // kv_chunk)
    pad = n_chunks * kv_chunk - t
    bias_BT = jnp.zeros((b, t), f32) if bias_BT is None else bias_BT
    bias_chunks = jnp.moveaxis(jnp.pad(bias_BT, ((0, 0), (0, pad)), constant_values=-jnp.inf)
                               .reshape(b, n_chunks, kv_chunk), 1, 0)
    k_chunks, v_chunks = (jnp.moveaxis(jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
                                       .reshape(b, n, n_chunks, kv_chunk, kd), 2, 0) for a in (k_BNTK, v_BNTK))

    @jax.checkpoint
    def step(carry, xs):
        acc_BNSK, row_max_BNS1, denom_BNS1 = carry
        bias_c, k_c, v_c = xs
        logits = jnp.einsum("bnsk,bntk->bnst", q_BNSK, k_c, preferred_element_type=f32) + bias_c[:, None, None, :]
        new_max = jnp.maximum(row_max_BNS1, jnp.max(logits, axis=-1, keepdims=True))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        correction = jnp.exp(row_max_BNS1 - safe_max)
        weights = jnp.exp(logits - safe_max)
        acc_BNSK = acc_BNSK * correction + jnp.einsum(
            "bnst,bntk->bnsk", weights.astype(v_c.dtype), v_c, preferred_element_type=f32)
        denom_BNS1 = denom_BNS1 * correction + jnp.sum(weights, axis=-1, keepdims=True)
        return (acc_BNSK, new_max, denom_BNS1), None

    return jax.lax.scan(step, carry, (bias_chunks, k_chunks, v_chunks))[0]


def query_blocks(s, chunk_size):
    """(count, size) of the query blocks "chunked" attention splits s queries into: the fewest blocks of at most
    `chunk_size`, all the same size, so at most count - 1 padded rows are computed and dropped (1,280 queries in
    blocks of at most 1,024 are 2 x 640, not 2 x 1,024 with 768 rows of padding)."""
    n_chunks = -(-s // max(1, min(chunk_size, s)))
    return n_chunks, -(-s // n_chunks)


def resolve_attention(implementation, dtype, backend=None) -> str:
    """The concrete implementation `attention` runs for `implementation` and compute dtype on `backend`.

    "auto" picks the fastest exact kernel each backend has:
      GPU: "cudnn" (flash attention) for bf16/fp16 inputs; cuDNN has no fp32 kernel, so fp32 runs "chunked",
           which is memory-bounded like flash attention (the one-shot "xla" path needs [B, N, S, S] fp32 logits,
           51 GB at 32,760 tokens and 12 heads);
      TPU: "splash" (the Pallas splash kernel);
      CPU and anything else: "chunked".
    Every other name is returned as given (after checking it exists).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "cudnn" if jnp.dtype(dtype) in _HALF else "chunked"
    if backend == "tpu":
        return "splash"
    return "chunked"


def attention(q_BSNK, k_BTNK, v_BTNK, *, implementation="xla", scale=None, kv_lens=None, key_bias=None,
              chunk_size=1024, kv_chunk_size=None, block_q=512, block_kv=512):
    """Multi-head softmax attention softmax(scale * q k^T + bias) v; the one attention entry point of the models.

    implementation:
      "auto"    per backend and dtype, see `resolve_attention` (cudnn on GPU in bf16, splash on TPU, else chunked).
      "xla"     plain einsum/softmax; materialises [B, N, S, T] fp32 logits.
      "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"): GPU only, bf16/fp16 inputs, no key_bias.
      "chunked" memory-bounded: queries in equal blocks of at most `chunk_size` (`query_blocks`) under lax.map,
                each block rematerialised in the backward pass, so only [B, N, chunk_size, T] logits live at once;
                with `kv_chunk_size`, keys are also streamed with an online softmax ([B, N, chunk_size, kv_chunk_size]).
      "splash"  the Pallas TPU splash kernel (`models/splash.py`) with tiles `block_q` x `block_kv`; any S and T
                (padded and masked inside); interpret mode off TPU; no key_bias.
    An implementation that cannot take its inputs (a bias, a dtype) raises; nothing falls back silently.
    scale: defaults to 1/sqrt(K). Callers holding an fp32 q can fold the scale in before casting and pass 1.0.
    kv_lens: optional int [B]; keys at positions >= kv_lens[b] are masked out (padded tokens).
    key_bias: optional fp32 [T] or [B, T] added to the logits of every query (e.g. log-multiplicities).
    Returns [B, S, N, K] in q's dtype.
    """
    implementation = resolve_attention(implementation, q_BSNK.dtype)
    scale = 1.0 / math.sqrt(q_BSNK.shape[-1]) if scale is None else scale
    out_dtype = q_BSNK.dtype
    if implementation == "cudnn":
        if key_bias is not None:
            raise ValueError("the cudnn attention path takes no key_bias; use 'xla' or 'chunked'")
        if q_BSNK.dtype not in _HALF:
            raise ValueError(f"cudnn attention needs bfloat16/float16 inputs, got {q_BSNK.dtype}: set the compute "
                             f"dtype to bfloat16, or use attention 'chunked' (or 'auto') for fp32")
        return jax.nn.dot_product_attention(q_BSNK, k_BTNK, v_BTNK, scale=scale, key_value_seq_lengths=kv_lens,
                                            implementation="cudnn").astype(out_dtype)
    if implementation == "splash":
        from pickstyle_jax.models import splash  # lazily: the Pallas TPU import is needed only here

        return splash.attention(q_BSNK, k_BTNK, v_BTNK, kv_lens=kv_lens, scale=scale, key_bias=key_bias,
                                block_q=block_q, block_kv=block_kv)
    if scale != 1.0:  # on q rather than on the [S, T] logits: one pass fewer over the largest array
        q_BSNK = (q_BSNK.astype(f32) * scale).astype(out_dtype)
    bias_BT = _key_bias(q_BSNK.shape[0], k_BTNK.shape[1], kv_lens, key_bias)
    # head-major layout makes both products plain batched matmuls
    q_BNSK, k_BNTK, v_BNTK = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q_BSNK, k_BTNK, v_BTNK))
    if implementation == "xla":
        out_BNSK = _attend(q_BNSK, k_BNTK, v_BNTK, bias_BT)
    else:
        b, n, s, kd = q_BNSK.shape
        n_chunks, chunk = query_blocks(s, chunk_size)
        q_pad = jnp.pad(q_BNSK, ((0, 0), (0, 0), (0, n_chunks * chunk - s), (0, 0)))
        q_chunks = jnp.moveaxis(q_pad.reshape(b, n, n_chunks, chunk, kd), 2, 0)

        @jax.checkpoint
        def one_chunk(q_c):
            if kv_chunk_size is not None and kv_chunk_size < k_BNTK.shape[2]:
                return _attend_online(q_c, k_BNTK, v_BNTK, bias_BT, kv_chunk_size)
            return _attend(q_c, k_BNTK, v_BNTK, bias_BT)

        out_BNSK = jnp.moveaxis(jax.lax.map(one_chunk, q_chunks), 0, 2).reshape(b, n, n_chunks * chunk, kd)[:, :, :s]
    return jnp.transpose(out_BNSK, (0, 2, 1, 3)).astype(out_dtype)


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


_SHARDED_OUT = ("heads", "mlp")  # kernel output axes whose sharding the layer's activations keep


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


def _constrain_rows(x, feature_axis):
    """`constrain` for a [batch, (length, ...) features] activation; 0-d / 1-d arrays pass through."""
    if x.ndim < 2:
        return x
    return constrain(x, ("batch",) + ("length",) * (x.ndim - 2) + (feature_axis,))


def constrain_output(y, kernel_axes):
    """Pin the output [batch, ..., out] of a dense layer with kernel axes (in, out): split by batch, and over heads /
    mlp where the kernel's output axis is."""
    return _constrain_rows(y, kernel_axes[1] if kernel_axes[1] in _SHARDED_OUT else None)


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
#              steps of the online-softmax recurrence of `_attend_online` (queries in blocks of chunk_size, keys
#              in blocks of kv_chunk_size); any head count; XLA einsums, not the fused kernels.
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
        one_block = jax.checkpoint(lambda st, q_c: _online(st, q_c, k_blk, v_blk, bias_BT, chunk))
        state = jax.lax.map(lambda xs: one_block(*xs), (state, q_QBNSK))
        k_blk, v_blk = (jax.lax.ppermute(a, axes, ring) for a in (k_blk, v_blk))
        return (state, k_blk, v_blk), None

    init = jax.vmap(_online_init)(q_QBNSK)
    (acc, _, denom), _, _ = jax.lax.scan(step, (init, k_BNTK, v_BNTK), jnp.arange(n_shards))[0]
    out_BNSK = jnp.moveaxis(acc / denom, 0, 2).reshape(b, n, n_q * q_blk, kd)[:, :, :s_loc]
    return jnp.transpose(out_BNSK, (0, 2, 1, 3)).astype(q_BSNK.dtype)
