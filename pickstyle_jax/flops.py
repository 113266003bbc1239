"""Analytic FLOP counts of the Wan DiT and the devices' peak bf16 rates: what MFU is measured against.

An analytic count, not XLA's cost analysis: the cost analysis of a compiled step counts a `while` body once (the
scanned blocks, the chunked attention's loops), counts remat recompute as work, and adds every elementwise op.
Counts are 2 FLOPs per multiply-add. S video tokens, L = text_len rows (the count assumes all 512 rows, as the
official model attends to; the padding fold makes the real work smaller), D width, F ffn_dim, per block:

    self-attention projections q,k,v,o   4 * 2*S*D^2
    self-attention scores + values       2 * 2*S^2*D
    cross-attention q,o projections      2 * 2*S*D^2
    cross-attention k,v projections      2 * 2*L*D^2
    cross-attention scores + values      2 * 2*S*L*D
    FFN                                  2 * 2*S*D*F

VACE blocks add after_proj 2*S*D^2 each and before_proj 2*S*D^2 once. Plus patch embeddings
2*S*(patch*16 + patch*96)*D, the text MLP 2*L*(text_dim*D + D^2) and the head 2*S*D*patch*out_dim; the time MLP is
negligible.

The LoRA train step: the backbone is frozen, so the backward computes activation gradients only: each matmul's input
gradient costs its forward again, and each attention product (scores, values) twice its forward. Useful FLOPs per
sample = 2 * forward + attention core; the VAE encode, the LoRA's own matmuls and remat recompute are not counted.
"""
from __future__ import annotations

import math

__all__ = ["forward_flops", "attention_core_flops", "train_step_flops", "PEAK_BF16", "peak_flops"]


def forward_flops(cfg, tokens: int) -> float:
    """FLOPs of one DiT forward of one sample at `tokens` video tokens (module docstring); cfg a wan.WanConfig."""
    s, d, f, length = tokens, cfg.dim, cfg.ffn_dim, cfg.text_len
    block = 8 * s * d * d + 4 * s * s * d + 4 * s * d * d + 4 * length * d * d + 4 * s * length * d + 4 * s * d * f
    n_vace = len(cfg.vace_layers)
    patch = math.prod(cfg.patch_size)
    total = (cfg.num_layers + n_vace) * block + n_vace * 2 * s * d * d + (2 * s * d * d if n_vace else 0)
    total += 2 * s * patch * (cfg.in_dim + (cfg.vace_in_dim if n_vace else 0)) * d
    total += 2 * length * (cfg.text_dim * d + d * d) + 2 * s * d * patch * cfg.out_dim
    return float(total)


def attention_core_flops(cfg, tokens: int) -> float:
    """FLOPs of the attention products (scores and values, self and cross) of one forward of one sample."""
    blocks = cfg.num_layers + len(cfg.vace_layers)
    return float(blocks * (4 * tokens * tokens * cfg.dim + 4 * tokens * cfg.text_len * cfg.dim))


def train_step_flops(cfg, tokens: int, batch: int = 1) -> float:
    """Useful FLOPs of one LoRA train step over `batch` samples: batch * (2 * forward + attention core)."""
    return float(batch) * (2 * forward_flops(cfg, tokens) + attention_core_flops(cfg, tokens))


# Dense bf16 peak FLOP/s per device, by a substring of jax's `device_kind` (first match wins: specific names first).
# TPU kinds as jax reports them: v5e is "TPU v5 lite", v5p "TPU v5" (or "TPU v5p"), v6e "TPU v6 lite".
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown (a CPU, an unlisted chip)."""
    for name, peak in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return peak
    return None
