"""Run-time options of the Wan DiT (models/wan.py): how `wan.forward` computes, never what the parameters are.

A `wan.WanConfig` fixes the parameters and is saved with them; an `Options` value is chosen per run (per backend,
per benchmark, per training config) and is never saved. Changing an option never changes which checkpoint loads:
    dtype               compute dtype of the matmuls ("float32" | "bfloat16"); weights keep WanConfig.param_dtype
    attention           self-attention implementation (layers.attention): "auto" = cudnn on GPU in bf16 (chunked
                        in fp32), splash on TPU, chunked on CPU | "xla" | "cudnn" | "chunked" | "splash".
                        Cross-attention over the <= 513 text keys always takes the plain "xla" path, in query
                        blocks of attention_chunk once the video is longer (it needs the fold's logit bias, which
                        cudnn and splash cannot take)
    attention_chunk     query block of the "chunked" implementation, of ring attention (context_parallel) and of the
                        long-video cross-attention
    attention_kv_chunk  > 0: "chunked" also streams keys in blocks of this size with an online softmax
    splash_block_q/kv   splash kernel tiles (multiples of 128)
    remat_policy        per-block jax.checkpoint policy, see REMAT_POLICIES
    ffn_chunk           > 0: each block's FFN (norm, modulation, both matmuls, gate) runs over groups of at most
                        this many tokens, one group at a time and each rematerialised, so the [B, S, ffn_dim]
                        hidden activations never live all at once (forward or backward); 0: all tokens at once.
                        Under a context axis each device's S/c tokens are grouped (nothing moves between devices)
    fold_text_padding   the zero rows that pad the text to text_len all embed to one constant key/value: attending
                        to that row once with a log(count) logit bias is exact and skips (text_len - L - 1) rows of
                        text MLP, k/v projections and cross-attention
    context_parallel    how self-attention meets tokens that a "context" mesh axis splits (layers.self_attention):
                        "ulysses" (all-to-all to a head split; tensor x context must divide num_heads), "ring"
                        (key/value blocks passed around the devices; any head count) or "auto" (ulysses where the
                        heads divide, else ring). Nothing changes on a mesh without a context axis
    scan_layers         the layout a loader or init produces: True the stacked tree (blocks under lax.scan), False
                        the flat one. `wan.forward` reads the layout from the tree it is given, never from here.
`Options.default(backend)` gives the per-backend defaults: on CPU query blocks of 256 and the flat layout, on an
accelerator blocks of 1024 and the stacked layout (one compiled block instead of num_layers).
"""
from __future__ import annotations

import dataclasses

import jax

from pickstyle_jax.models import layers

__all__ = ["REMAT_POLICIES", "DTYPES", "Options"]

REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "nothing_saveable": "nothing_saveable",
    "everything_saveable": "everything_saveable",
    "dots_saveable": "dots_saveable",
    "checkpoint_dots": "checkpoint_dots",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims": "checkpoint_dots_with_no_batch_dims",
    # as "full", and inside the recomputed block the self-attention, cross-attention and FFN are each
    # rematerialised again: the block's backward holds one sub-block's intermediates at a time, not all three's
    "subblock": "nothing_saveable",
    # as "subblock", and in the scanned VACE layout every super-block (main block jP, VACE block j, main blocks
    # jP+1 .. jP+P-1) is rematerialised as a whole: the forward keeps one (x, c) pair per super-block instead of
    # one input per block (vace-14B: 16 instead of 48 fp32 [S, D] streams), for one more forward of every block
    # in the backward. Unrolled or without VACE it is "subblock"
    "nested": "nothing_saveable",
    # recompute everything, but keep each block's input in pinned host memory instead of on the device (the
    # official trainer's activation offload); needs a backend with a "pinned_host" memory kind
    "offload": "offload",
}
DTYPES = ("float32", "bfloat16")

# backend -> defaults over the dataclass's (the CPU chunk is bench/dit_forward.py's measured best)
_BACKEND_DEFAULTS = {"cpu": dict(attention_chunk=256, scan_layers=False)}
_ACCELERATOR_DEFAULTS = dict(scan_layers=True)


@jax.tree_util.register_static  # a pytree without leaves: passed through jax.jit as a static (hashed) value
@dataclasses.dataclass(frozen=True)
class Options:
    """How `wan.forward` runs (module docstring); frozen and hashable, static under jax.jit."""
    dtype: str = "float32"
    attention: str = "auto"
    attention_chunk: int = 1024
    attention_kv_chunk: int = 0
    splash_block_q: int = 512
    splash_block_kv: int = 512
    remat_policy: str = "none"
    ffn_chunk: int = 0
    fold_text_padding: bool = True
    context_parallel: str = "auto"
    scan_layers: bool = False

    def __post_init__(self):
        for name, allowed in (("dtype", DTYPES), ("remat_policy", REMAT_POLICIES),
                              ("attention", layers.ATTENTION_IMPLEMENTATIONS),
                              ("context_parallel", layers.CONTEXT_PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        for name in ("attention_chunk", "splash_block_q", "splash_block_kv"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.ffn_chunk) < 0:
            raise ValueError(f"ffn_chunk must be >= 0 (0: all tokens at once), got {self.ffn_chunk!r}")
        if int(self.attention_kv_chunk) < 0:
            raise ValueError(f"attention_kv_chunk must be >= 0 (0: no key blocks), got {self.attention_kv_chunk!r}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("attention='cudnn' needs a bfloat16 compute dtype (cuDNN flash attention has no fp32 "
                             "kernel); set dtype='bfloat16', or use attention 'auto' or 'chunked'")

    @classmethod
    def default(cls, backend: str | None = None, **overrides) -> "Options":
        """The defaults for `backend` (jax.default_backend() if None), then `overrides`."""
        backend = backend or jax.default_backend()
        base = _BACKEND_DEFAULTS.get(backend, _ACCELERATOR_DEFAULTS)
        return cls(**{**base, **overrides})

    def replace(self, **kw) -> "Options":
        return dataclasses.replace(self, **kw)
