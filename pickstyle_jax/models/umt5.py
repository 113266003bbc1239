"""umT5 encoder (the Wan2.1 text encoder), as pure functions of (config, params, inputs).

Dimension key: B batch, L tokens (query), K tokens (key), D d_model, H heads, E d_kv (head dim), F d_ff, V vocab,
N relative-position buckets.

Per layer (pre-norm): x <- x + Attn(RMS(x)); x <- x + FFN(RMS(x)); a final RMS after the last layer.
  RMS(x)  = scale * x * rsqrt(mean(x^2) + eps)                 (statistics in fp32; no mean, no bias)
  Attn    = softmax_fp32(Q K^T + bias_l[h, bucket(k - q)]) V    (NO 1/sqrt(E) scaling; padded keys get dtype min)
  FFN     = fc2( GELU_tanh(gate(x)) * fc1(x) )                  (no biases)
Every layer has its own [N, H] relative-position table (the umT5 difference from T5). Token embeddings are not
scaled. `encode` returns float32 and zeroes every position beyond the mask (the pad rows of the reference encoders
are garbage that the DiT discards anyway).

Parameter tree (mirrors the official Wan key names, PICKSTYLE.md §5; torch Linear [out, in] -> kernel [in, out]):
  token_embedding.embedding                 [V, D]      <- token_embedding.weight
  blocks.{i}.norm1.scale                    [D]         <- blocks.{i}.norm1.weight
  blocks.{i}.attn.{q,k,v}.kernel            [D, H*E]    <- blocks.{i}.attn.{q,k,v}.weight
  blocks.{i}.attn.o.kernel                  [H*E, D]    <- blocks.{i}.attn.o.weight
  blocks.{i}.pos_embedding.embedding.embedding  [N, H]  <- blocks.{i}.pos_embedding.embedding.weight
  blocks.{i}.norm2.scale                    [D]         <- blocks.{i}.norm2.weight
  blocks.{i}.ffn.gate.0.kernel              [D, F]      <- blocks.{i}.ffn.gate.0.weight   (the GELU branch)
  blocks.{i}.ffn.fc1.kernel                 [D, F]      <- blocks.{i}.ffn.fc1.weight      (the linear branch)
  blocks.{i}.ffn.fc2.kernel                 [F, D]      <- blocks.{i}.ffn.fc2.weight
  norm.scale                                [D]         <- norm.weight
The relative table keeps the generic rule "module path as in torch, an Embedding's `weight` becomes `embedding`":
the torch module `pos_embedding.embedding` is an nn.Embedding, hence the doubled `embedding.embedding`.

Layers are kept as separate per-layer dicts (no stacked scan) so that the converter stays a key table; 24 unrolled
layers compile in well under a minute.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pickstyle_jax.models.tokenizer import Tokenizer  # noqa: F401  (API: `umt5.Tokenizer`)

__all__ = ["Umt5Config", "init", "encode", "relative_position_buckets", "Tokenizer"]


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


# ---------------------------------------------------------------------------------------------------- params
def init(cfg: Umt5Config, rng) -> dict:
    """Random parameters (tests overwrite them): kernels N(0, 1/fan_in), embeddings N(0, 1), relative tables
    N(0, 0.01), unit norm scales. One jitted flat draw per layer: a couple of compiles, peak memory of one layer."""
    pdt = jnp.dtype(cfg.param_dtype)
    D, I, F, H, N = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_heads, cfg.num_buckets
    # (path inside a block, shape, std)
    layout = [(("attn", "q"), (D, I), D ** -0.5), (("attn", "k"), (D, I), D ** -0.5),
              (("attn", "v"), (D, I), D ** -0.5), (("attn", "o"), (I, D), I ** -0.5),
              (("ffn", "gate", "0"), (D, F), D ** -0.5), (("ffn", "fc1"), (D, F), D ** -0.5),
              (("ffn", "fc2"), (F, D), F ** -0.5), (("pos_embedding", "embedding"), (N, H), 0.1)]
    total = sum(math.prod(shape) for _, shape, _ in layout)

    @jax.jit
    def block(key):
        z = jax.random.normal(key, (total,), jnp.float32)
        out = {"norm1": {"scale": jnp.ones((D,), pdt)}, "norm2": {"scale": jnp.ones((D,), pdt)}}
        offset = 0
        for path, shape, std in layout:
            size = math.prod(shape)
            leaf = (std * z[offset:offset + size].reshape(shape)).astype(pdt)
            offset += size
            node = out
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = {"embedding" if path[0] == "pos_embedding" else "kernel": leaf}
        return out

    k_emb, *k_blocks = jax.random.split(rng, 1 + cfg.num_layers)
    blocks = {str(i): block(k) for i, k in enumerate(k_blocks)}
    return {
        "token_embedding": {"embedding": jax.random.normal(k_emb, (cfg.vocab_size, D), jnp.float32).astype(pdt)},
        "blocks": blocks,
        "norm": {"scale": jnp.ones((D,), pdt)},
    }


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
def _rms_norm(x, scale, eps):
    """scale * x * rsqrt(mean(x^2) + eps) with fp32 statistics; the result is cast to the compute dtype of x."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _dense(x, p):
    return jnp.dot(x, p["kernel"].astype(x.dtype))


def _attention(cfg: Umt5Config, p, x_BLD, bias_HLK, key_valid_BK):
    B, L, _ = x_BLD.shape
    H, E = cfg.num_heads, cfg.d_kv
    q_BLHE = _dense(x_BLD, p["q"]).reshape(B, L, H, E)
    k_BLHE = _dense(x_BLD, p["k"]).reshape(B, L, H, E)
    v_BLHE = _dense(x_BLD, p["v"]).reshape(B, L, H, E)
    logits_BHLK = jnp.einsum("blhe,bkhe->bhlk", q_BLHE, k_BLHE) + bias_HLK[None]  # no 1/sqrt(E): T5 convention
    logits_BHLK = jnp.where(key_valid_BK[:, None, None, :], logits_BHLK, jnp.finfo(x_BLD.dtype).min)
    probs_BHLK = jax.nn.softmax(logits_BHLK.astype(jnp.float32), axis=-1).astype(x_BLD.dtype)
    out_BLHE = jnp.einsum("bhlk,bkhe->blhe", probs_BHLK, v_BLHE)
    return _dense(out_BLHE.reshape(B, L, H * E), p["o"])


def _ffn(p, x_BLD):
    return _dense(_gelu_tanh(_dense(x_BLD, p["gate"]["0"])) * _dense(x_BLD, p["fc1"]), p["fc2"])


@functools.partial(jax.jit, static_argnums=(0,))
def encode(cfg: Umt5Config, params: dict, ids, mask):
    """ids, mask: [B, L] (mask 1/True on real tokens, `</s>` included) -> [B, L, d_model] float32, 0 where mask is 0.

    Runs in `cfg.dtype`; jitted with the config static, so each (config, B, L) compiles once.
    """
    dt = jnp.dtype(cfg.dtype)
    ids = jnp.asarray(ids, jnp.int32)
    valid_BL = jnp.asarray(mask).astype(bool)
    B, L = ids.shape
    buckets_LK = jnp.asarray(relative_position_buckets(L, L, cfg.num_buckets, cfg.max_distance))

    x_BLD = jnp.take(params["token_embedding"]["embedding"], ids, axis=0).astype(dt)
    for i in range(cfg.num_layers):
        p = params["blocks"][str(i)]
        table_NH = p["pos_embedding"]["embedding"]["embedding"].astype(dt)
        bias_HLK = jnp.transpose(jnp.take(table_NH, buckets_LK, axis=0), (2, 0, 1))
        x_BLD = x_BLD + _attention(cfg, p["attn"], _rms_norm(x_BLD, p["norm1"]["scale"], cfg.eps), bias_HLK, valid_BL)
        x_BLD = x_BLD + _ffn(p["ffn"], _rms_norm(x_BLD, p["norm2"]["scale"], cfg.eps))
    x_BLD = _rms_norm(x_BLD, params["norm"]["scale"], cfg.eps)
    return jnp.where(valid_BL[..., None], x_BLD.astype(jnp.float32), 0.0)
