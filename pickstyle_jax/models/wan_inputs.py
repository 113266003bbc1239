"""What the Wan DiT (models/wan.py) takes in and gives back, outside its modules: latent videos <-> patch tokens,
the text rows with their padding fold, and the checks of `wan.forward`'s arguments. Pure array code; `cfg` is a
`wan.WanConfig`. Dimension key as in models/wan.py (P here: the p_t*p_h*p_w*C features of one patch).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def patchify(x_BFHWC, patch_size):
    """[B, F, H, W, C] -> [B, S, p_t*p_h*p_w*C], tokens frame-major, patch features ordered (p_t, p_h, p_w, c)."""
    b, f, h, w, c = x_BFHWC.shape
    pt, ph, pw = patch_size
    x = x_BFHWC.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(y_BSP, grid, patch_size):
    b = y_BSP.shape[0]
    (gf, gh, gw), (pt, ph, pw) = grid, patch_size
    y = y_BSP.reshape(b, gf, gh, gw, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, gf * pt, gh * ph, gw * pw, -1)


def fold_text(cfg, text_BLC, text_lens=None, *, fold: bool = True):
    """The text rows the model embeds and their logit bias: (rows [B, L', text_dim], bias [B, L'] fp32 or None).

    The reference zero-pads every prompt to text_len rows and attends to all of them. Zero rows all embed to one
    constant key/value, so attending to m of them equals attending to one with logit bias log(m). With `fold`
    (the options' fold_text_padding) the rows kept are the given L plus one zero row;
    sample b's rows at or beyond text_lens[b] are masked (-inf) and its zero row carries log(text_len -
    text_lens[b]) (-inf when nothing is padded). Without it, the text is zero-padded to text_len rows.
    """
    b, n, _ = text_BLC.shape
    if text_lens is not None:
        lens_B = jnp.asarray(text_lens, jnp.int32).reshape(b)
        text_BLC = jnp.where((jnp.arange(n)[None, :] < lens_B[:, None])[..., None], text_BLC, 0)
    elif cfg.text_len - n <= 1:
        return jnp.pad(text_BLC, ((0, 0), (0, cfg.text_len - n), (0, 0))), None
    if not fold:
        return jnp.pad(text_BLC, ((0, 0), (0, cfg.text_len - n), (0, 0))), None
    if text_lens is None:
        lens_B = jnp.full((b,), n, jnp.int32)
    valid_BL = jnp.arange(n)[None, :] < lens_B[:, None]
    n_pad_B = (cfg.text_len - lens_B).astype(f32)
    pad_bias_B1 = jnp.where(n_pad_B > 0, jnp.log(jnp.maximum(n_pad_B, 1.0)), -jnp.inf)[:, None]
    bias_BL = jnp.concatenate([jnp.where(valid_BL, 0.0, -jnp.inf).astype(f32), pad_bias_B1], axis=1)
    return jnp.pad(text_BLC, ((0, 0), (0, 1), (0, 0))), bias_BL


def check_latents(cfg, x, t):
    """The checks of the latents x and times t (`wan.embed`'s inputs)."""
    if x.ndim != 5 or x.shape[-1] != cfg.in_dim:
        raise ValueError(f"x must be [B, F, H, W, {cfg.in_dim}] channels-last latents, got shape {x.shape}")
    b, f, h, w, _ = x.shape
    if any(n % p for n, p in zip((f, h, w), cfg.patch_size)):
        raise ValueError(f"latent (F, H, W) = {(f, h, w)} must be divisible by the patch size {cfg.patch_size}")
    if np.shape(t) not in ((b,), ()):
        raise ValueError(f"t must have shape [B] = [{b}] (or be a scalar), got {np.shape(t)}")


def check_inputs(cfg, x, t, text, vace_context, context_scale, text_lens=None):
    check_latents(cfg, x, t)
    b, f, h, w, _ = x.shape
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
        raise ValueError(f"text must be [B={b}, L, {cfg.text_dim}], got shape {text.shape}")
    if text.shape[1] > cfg.text_len:
        raise ValueError(f"text length {text.shape[1]} exceeds text_len {cfg.text_len}")
    if text_lens is not None and np.shape(text_lens) != (b,):
        raise ValueError(f"text_lens must have shape [B] = [{b}], got {np.shape(text_lens)}")
    if cfg.has_vace:
        want = (b, f, h, w, cfg.vace_in_dim)
        if vace_context is None:
            raise ValueError(f"this VACE model needs vace_context of shape {want}")
        if tuple(vace_context.shape) != want:
            raise ValueError(f"vace_context must have shape {want} (x's B, F, H, W), got {vace_context.shape}")
        if np.ndim(context_scale) > 1 or np.size(context_scale) not in (1, len(cfg.vace_layers)):
            raise ValueError(f"context_scale must be a scalar or have {len(cfg.vace_layers)} entries, "
                             f"got shape {np.shape(context_scale)}")
    elif vace_context is not None:
        raise ValueError("vace_context given but this config has no VACE layers (vace_layers=())")
