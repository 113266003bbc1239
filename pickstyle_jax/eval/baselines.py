"""Cheap "stylisations" a trained model should beat: colour statistics transferred onto the source.

    mean, std = channel_stats(style_images)          # uint8 [..., 3]: per-channel mean and std over all pixels
    out = color_transfer(source_clip, mean, std)     # uint8 [F, H, W, 3]

`color_transfer` is Reinhard-style colour transfer in RGB on [0, 255] floats: per channel c,
out = (src - mean_src[c]) / std_src[c] * std[c] + mean[c], with the clip's own statistics over all its frames and
pixels, then clipped to [0, 255] and rounded to uint8 (round half to even, numpy's). Standard deviations are
population ones (ddof 0). A channel constant over the clip (std_src 0) has no deviation to scale: it becomes mean[c].
It matches the style's average colour and contrast per channel while keeping every edge of the source, which is
what a palette alone buys: a stylisation that only learned the style's colours scores about this.
numpy only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["channel_stats", "color_transfer"]


def _rgb(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim < 2 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 [..., 3] (RGB in [0, 255]), got {x.dtype} {x.shape}")
    return x


def channel_stats(images) -> tuple[np.ndarray, np.ndarray]:
    """(mean [3], std [3]) float64 over every pixel of uint8 images [..., 3] (population std)."""
    px = _rgb(images, "images").reshape(-1, 3).astype(np.float64)
    if len(px) == 0:
        raise ValueError("channel_stats needs at least one pixel")
    return px.mean(0), px.std(0)


def color_transfer(clip, mean, std) -> np.ndarray:
    """uint8 clip [F, H, W, 3] with its per-channel mean/std (over all frames) moved to `mean`/`std` ([3] each, in
    [0, 255] units): the module docstring's formula."""
    clip = _rgb(clip, "clip")
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (3,) or std.shape != (3,) or not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"mean and std must be 3 finite numbers each (one per RGB channel), got {mean} and {std}")
    x = clip.astype(np.float64)
    m_src, s_src = channel_stats(clip)
    gain = np.divide(std, s_src, out=np.zeros(3), where=s_src > 0)
    out = (x - m_src) * gain + mean
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
