"""Attention kernels: exact softmax attention of [B, S, N, K] queries against [B, T, N, K] keys, whole ("xla"),
in query blocks with an online softmax over key blocks ("chunked"), cuDNN's fused kernel or TPU splash, and the
per-backend choice between them (`resolve_attention`). `layers` re-exports the public names (`layers.attention`).

Dimension key: B batch, S query tokens, T key tokens, N heads, K head dim.

Precision rules (PICKSTYLE.md §2.6): matmuls take inputs in the compute dtype and accumulate in fp32
(`preferred_element_type`); softmax statistics run in fp32 whatever the compute dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

f32 = jnp.float32

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "splash")
_HALF = (jnp.bfloat16, jnp.float16)


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
    acc, _, denom = online_update(online_init(q_BNSK), q_BNSK, k_BNTK, v_BNTK, bias_BT, kv_chunk)
    return acc / denom


def online_init(q_BNSK):
    """The empty state (acc [B, N, S, K], row max [B, N, S, 1], denominator [B, N, S, 1]) of `online_update`."""
    b, n, s, kd = q_BNSK.shape
    return jnp.zeros((b, n, s, kd), f32), jnp.full((b, n, s, 1), -jnp.inf, f32), jnp.zeros((b, n, s, 1), f32)


def online_update(carry, q_BNSK, k_BNTK, v_BNTK, bias_BT, kv_chunk):
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
