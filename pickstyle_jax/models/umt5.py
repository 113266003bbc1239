"""umT5 encoder (the Wan2.1 text encoder) as a Flax NNX module, used through pure functions of (config, params, inputs).

Dimension key: B batch, L tokens (query), K tokens (key), D d_model, H heads, E d_kv (head dim), F d_ff, V vocab,
N relative-position buckets.

Per layer (pre-norm): x <- x + Attn(RMS(x)); x <- x + FFN(RMS(x)); a final RMS after the last layer.
  RMS(x)  = scale * x * rsqrt(mean(x^2) + eps)                 (statistics in fp32; no mean, no bias)
  Attn    = softmax_fp32(Q K^T + bias_l[h, bucket(k - q)]) V    (NO 1/sqrt(E) scaling; padded keys masked out)
  FFN     = fc2( GELU_tanh(gate(x)) * fc1(x) )                  (no biases)
Every layer has its own [N, H] relative-position table (the umT5 difference from T5). Token embeddings are not
scaled. `encode` returns float32 and zeroes every position beyond the mask (the pad rows of the reference encoders
are garbage that the DiT discards anyway).

Precision: weights are stored in `param_dtype`, activations and matmul inputs are in `dtype`; matmuls accumulate in
fp32, norm statistics, attention logits and softmax run in fp32 (`layers.dense`, `layers.rms_norm`,
`layers.gelu_tanh`). In float32 this is the reference computation; in bfloat16 it rounds less often than
transformers' UMT5 (which rounds the logits and the normalised activations to bf16 before scaling them).

Parameter tree (the module's attribute paths, which mirror the official Wan key names, PICKSTYLE.md §5; torch
Linear [out, in] -> kernel [in, out]), with the logical axis names the sharding rules read:
  token_embedding.embedding                 [V, D]      vocab, embed   <- token_embedding.weight
  blocks.{i}.norm1.scale                    [D]         embed          <- blocks.{i}.norm1.weight
  blocks.{i}.attn.{q,k,v}.kernel            [D, H*E]    embed, heads   <- blocks.{i}.attn.{q,k,v}.weight
  blocks.{i}.attn.o.kernel                  [H*E, D]    heads, embed   <- blocks.{i}.attn.o.weight
  blocks.{i}.pos_embedding.embedding.embedding  [N, H]  replicated     <- blocks.{i}.pos_embedding.embedding.weight
  blocks.{i}.norm2.scale                    [D]         embed          <- blocks.{i}.norm2.weight
  blocks.{i}.ffn.gate.0.kernel              [D, F]      embed, mlp     <- blocks.{i}.ffn.gate.0.weight  (GELU branch)
  blocks.{i}.ffn.fc1.kernel                 [D, F]      embed, mlp     <- blocks.{i}.ffn.fc1.weight     (linear branch)
  blocks.{i}.ffn.fc2.kernel                 [F, D]      mlp, embed     <- blocks.{i}.ffn.fc2.weight
  norm.scale                                [D]         embed          <- norm.weight
The relative table keeps the generic rule "module path as in torch, an Embedding's `weight` becomes `embedding`":
the torch module `pos_embedding.embedding` is an nn.Embedding, hence the doubled `embedding.embedding`.

Layers are separate modules under `blocks` (an nnx.Dict keyed "0", "1", ...), run unrolled, so that the converter
stays a key table and checkpoints keep the official names; 24 unrolled layers compile in well under a minute.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pickstyle_jax import sharding
from pickstyle_jax.models import layers
from pickstyle_jax.tokenizer import Tokenizer  # noqa: F401  (API: `umt5.Tokenizer`)

__all__ = ["Umt5Config", "Umt5Encoder", "init", "encode", "param_axes", "param_shapes", "relative_position_buckets",
           "Tokenizer"]

f32 = jnp.float32
_HEAD_AXES = ("batch", "length", "heads", None)  # [B, L, H, E]: whole heads per device


@dataclasses.dataclass(frozen=True)
class Umt5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    param_dtype: str = "bfloat16"  # storage dtype of the weights
    dtype: str = "bfloat16"        # compute dtype of activations and matmuls (norm stats and softmax stay fp32)

    @classmethod
    def named(cls, name: str) -> "Umt5Config":
        if name == "umt5-xxl":
            return cls()
        if name == "tiny":
            return cls(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       param_dtype="float32", dtype="float32")
        raise ValueError(f"unknown umT5 config {name!r}; expected 'umt5-xxl' or 'tiny'")

    def replace(self, **kw) -> "Umt5Config":
        return dataclasses.replace(self, **kw)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


# ---------------------------------------------------------------------------------------------------- modules
# Random init (tests and converters overwrite it): kernels N(0, 1/fan_in), token embeddings N(0, 1), relative
# tables N(0, 0.1^2), unit norm scales; drawn in fp32 and stored in param_dtype.


def _normal(rngs, shape, std, dtype):
    return (std * jax.random.normal(rngs.params(), shape, f32)).astype(dtype)


class Dense(nnx.Module):
    """A bias-free Linear, kernel [in, out]."""

    def __init__(self, n_in: int, n_out: int, axes, dtype, *, rngs: nnx.Rngs):
        self.kernel = layers.param(_normal(rngs, (n_in, n_out), n_in ** -0.5, dtype), axes)
        self.axes = tuple(axes)

    def __call__(self, x):
        y = layers.dense(x, {"kernel": layers.gathered(self.kernel[...], self.axes)}, dtype=x.dtype)
        return layers.constrain_output(y, self.axes)


class Embed(nnx.Module):
    def __init__(self, n: int, d: int, axes, std: float, dtype, *, rngs: nnx.Rngs):
        self.embedding = layers.param(_normal(rngs, (n, d), std, dtype), axes)


class RmsNorm(nnx.Module):
    def __init__(self, d: int, eps: float, dtype):
        self.scale = layers.param(jnp.ones((d,), dtype), ("embed",))
        self.eps = eps

    def __call__(self, x):
        """Normalised in fp32, returned in x's (compute) dtype."""
        return layers.rms_norm(x, {"scale": layers.gathered(self.scale[...], ("embed",))}, eps=self.eps).astype(x.dtype)


class RelativeBias(nnx.Module):
    """The per-layer [N, H] relative position table (torch: `pos_embedding.embedding`, an nn.Embedding)."""

    def __init__(self, cfg: Umt5Config, dtype, *, rngs: nnx.Rngs):
        self.embedding = Embed(cfg.num_buckets, cfg.num_heads, (None, None), 0.1, dtype, rngs=rngs)

    def __call__(self, buckets_LK):
        """[H, L, K] fp32 logit bias."""
        table_NH = self.embedding.embedding[...].astype(f32)
        return jnp.transpose(jnp.take(table_NH, buckets_LK, axis=0), (2, 0, 1))


class Attention(nnx.Module):
    def __init__(self, cfg: Umt5Config, dtype, *, rngs: nnx.Rngs):
        d, i = cfg.d_model, cfg.inner_dim
        self.q, self.k, self.v = (Dense(d, i, ("embed", "heads"), dtype, rngs=rngs) for _ in range(3))
        self.o = Dense(i, d, ("heads", "embed"), dtype, rngs=rngs)
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def __call__(self, x_BLD, bias_HLK, key_valid_BK):
        B, L, _ = x_BLD.shape
        H, E = self.num_heads, self.d_kv
        q_BLHE, k_BLHE, v_BLHE = (layers.constrain(proj(x_BLD).reshape(B, L, H, E), _HEAD_AXES)
                                  for proj in (self.q, self.k, self.v))
        # no 1/sqrt(E): the T5 convention (the scale is folded into the trained weights)
        logits_BHLK = jnp.einsum("blhe,bkhe->bhlk", q_BLHE, k_BLHE, preferred_element_type=f32) + bias_HLK[None]
        logits_BHLK = jnp.where(key_valid_BK[:, None, None, :], logits_BHLK, jnp.finfo(f32).min)
        probs_BHLK = jax.nn.softmax(logits_BHLK, axis=-1).astype(x_BLD.dtype)
        out_BLHE = layers.constrain(jnp.einsum("bhlk,bkhe->blhe", probs_BHLK, v_BLHE, preferred_element_type=f32),
                                    _HEAD_AXES)
        return self.o(out_BLHE.astype(x_BLD.dtype).reshape(B, L, H * E))


class GatedFfn(nnx.Module):
    def __init__(self, cfg: Umt5Config, dtype, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.gate = nnx.Dict({"0": Dense(d, f, ("embed", "mlp"), dtype, rngs=rngs)})  # torch: Sequential(Linear, GELU)
        self.fc1 = Dense(d, f, ("embed", "mlp"), dtype, rngs=rngs)
        self.fc2 = Dense(f, d, ("mlp", "embed"), dtype, rngs=rngs)

    def __call__(self, x_BLD):
        return self.fc2(layers.gelu_tanh(self.gate["0"](x_BLD)) * self.fc1(x_BLD))


class Block(nnx.Module):
    def __init__(self, cfg: Umt5Config, dtype, *, rngs: nnx.Rngs):
        self.norm1 = RmsNorm(cfg.d_model, cfg.eps, dtype)
        self.attn = Attention(cfg, dtype, rngs=rngs)
        self.pos_embedding = RelativeBias(cfg, dtype, rngs=rngs)
        self.norm2 = RmsNorm(cfg.d_model, cfg.eps, dtype)
        self.ffn = GatedFfn(cfg, dtype, rngs=rngs)

    def __call__(self, x_BLD, buckets_LK, valid_BL):
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), self.pos_embedding(buckets_LK), valid_BL)
        return x_BLD + self.ffn(self.norm2(x_BLD))


class Umt5Encoder(nnx.Module):
    def __init__(self, cfg: Umt5Config, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.token_embedding = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), 1.0, pdt, rngs=rngs)
        self.blocks = nnx.Dict({str(i): Block(cfg, pdt, rngs=rngs) for i in range(cfg.num_layers)})
        self.norm = RmsNorm(cfg.d_model, cfg.eps, pdt)

    def __call__(self, ids_BL, mask_BL):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        valid_BL = jnp.asarray(mask_BL).astype(bool)
        L = ids_BL.shape[1]
        buckets_LK = jnp.asarray(relative_position_buckets(L, L, cfg.num_buckets, cfg.max_distance))
        table_VD = layers.gathered(self.token_embedding.embedding[...], ("vocab", "embed"))
        x_BLD = jnp.take(table_VD, jnp.asarray(ids_BL, jnp.int32), axis=0).astype(dt)
        for i in range(cfg.num_layers):
            x_BLD = layers.constrain(self.blocks[str(i)](x_BLD, buckets_LK, valid_BL), ("batch", "length", "embed"))
        x_BLD = self.norm(x_BLD)
        return jnp.where(valid_BL[..., None], x_BLD.astype(f32), 0.0)


# ---------------------------------------------------------------------------------------------------- params
def init(cfg: Umt5Config, rng) -> dict:
    """Random parameters as a plain nested dict (the tree the converter and checkpoints use); jit-able."""
    return layers.init_params(Umt5Encoder, cfg, rng)


def param_shapes(cfg: Umt5Config) -> dict:
    """Same tree as `init`, leaves jax.ShapeDtypeStruct; nothing allocated."""
    return layers.abstract_params(Umt5Encoder, cfg)


def _heads(cfg: Umt5Config) -> sharding.Units:
    return sharding.Units("heads", cfg.num_heads, "num_heads")


def param_axes(cfg: Umt5Config) -> dict:
    """Same tree as `init`, leaves the logical axis names ("vocab", "embed", "heads", "mlp", None); "heads" is a
    `sharding.Units` of cfg.num_heads (split only over mesh axes that divide it)."""
    return layers.logical_axes(Umt5Encoder, cfg, units=(_heads(cfg),))


# -------------------------------------------------------------------------------------------- position buckets
def _bucket_of_distance(num_buckets: int, max_distance: int) -> np.ndarray:
    """bucket of |rel| for |rel| in [0, max_distance] (one-sided half of the bidirectional buckets).

    Evaluated the way both references do it (fp32 log, truncation toward zero), so table boundaries agree exactly.
    """
    half = num_buckets // 2
    max_exact = half // 2
    r = np.arange(max_distance + 1)
    with np.errstate(divide="ignore"):
        log_ratio = (np.log(np.maximum(r, 1).astype(np.float32) / np.float32(max_exact))
                     / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + log_ratio.astype(np.int64), half - 1)
    return np.where(r < max_exact, r, large)


@functools.lru_cache(maxsize=64)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """[q_len, k_len] int32 bucket of rel = key_pos - query_pos (bidirectional: keys after the query: upper half).

    A host constant: lengths are static under jit.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    dist = np.minimum(np.abs(rel), max_distance)  # every |rel| >= max_distance lands in the last bucket
    out = (rel > 0) * (num_buckets // 2) + _bucket_of_distance(num_buckets, max_distance)[dist]
    out = out.astype(np.int32)
    out.setflags(write=False)
    return out


# ---------------------------------------------------------------------------------------------------- forward
@functools.partial(jax.jit, static_argnums=(0,))
def encode(cfg: Umt5Config, params: dict, ids, mask):
    """ids, mask: [B, L] (mask 1/True on real tokens, `</s>` included) -> [B, L, d_model] float32, 0 where mask is 0.

    Runs in `cfg.dtype`; jitted with the config static, so each (config, B, L) compiles once. `params` is the plain
    dict of `init` / `checkpoints.load_umt5`, merged into the module inside the jitted function. Sharded params
    need nothing more: the encoder pins its own layout on their mesh (`layers.layout`), as `wan.forward` does.
    """
    with layers.layout((params, ids), units=(_heads(cfg),)):
        return layers.bind(Umt5Encoder, cfg, params)(ids, mask)
