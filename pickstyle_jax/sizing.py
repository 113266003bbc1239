"""Frame count and frame size of a stylisation, and the windows of a long video (host-side numpy, no JAX).

The official rule (Wan VACE at 480p): the output keeps the source's aspect ratio under an area cap of 480*832
pixels = 1560 units of 16x16 (one unit = one DiT token per latent frame), and the DiT sequence is capped at 32,760
tokens (= 1560 * 21 latent frames):
    a_z = min(cap, (H_in // 16) * (W_in // 16)),   f = min((n - 1) // 4 + 1, seq_cap // a_z)
    A'  = min(a_z, seq_cap // f),   oh = round(sqrt(A' * H_in / W_in)),   ow = int(A' / oh)
giving 16*oh x 16*ow pixels and F = 4(f - 1) + 1 frames (the causal VAE encodes 1 + 4k frames). 16:9 -> 480x832,
9:16 -> 848x464, square -> 624x640. Inputs under the cap keep their size (cropped to 16-multiples). "720p" is the
same rule with 1280*720 pixels (3600 units, 75,600 tokens). The frames are resized bicubically by the larger of the
two ratios and centre-cropped. Frame indices are round(linspace(0, F_in - 1, F)): a short video is stretched by
repeating frames, a long one sampled uniformly over its whole duration.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

__all__ = ["Plan", "plan", "frame_count", "resize_crop", "Windows", "windows", "mirror_pad"]

_AREAS = {"480p": (480 * 832 // 256, 32760), "720p": (1280 * 720 // 256, 75600)}


@dataclasses.dataclass(frozen=True)
class Plan:
    height: int
    width: int
    frames: int  # 4k + 1
    indices: tuple[int, ...]  # source frame of every output frame

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1


def frame_count(n: int) -> int:
    """Largest 4k + 1 <= n (at least 1)."""
    return 4 * ((max(1, int(n)) - 1) // 4) + 1


def _parse(size):
    if isinstance(size, str) and size in _AREAS:
        return _AREAS[size], None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(size)) if isinstance(size, str) else None
    hw = (int(m.group(1)), int(m.group(2))) if m else tuple(size) if isinstance(size, (tuple, list)) else None
    if hw is None or len(hw) != 2:
        raise ValueError(f"size must be '480p', '720p' or 'HxW' (e.g. '480x832'), got {size!r}")
    if any(v <= 0 or v % 16 for v in hw):
        raise ValueError(f"size {hw[0]}x{hw[1]}: height and width must be positive multiples of 16 (the VAE "
                         f"downsamples by 8 and the DiT patches by 2)")
    return None, hw


def plan(n_in: int, h_in: int, w_in: int, *, size="480p", max_frames: int = 81, keep_frames: bool = False) -> Plan:
    """Output size and frame indices for a source of n_in frames of h_in x w_in pixels.

    keep_frames: the frame count is the source's (long-video windows decide the temporal layout themselves);
    only the spatial rule applies, with the token cap evaluated for `max_frames`.
    """
    if n_in < 1:
        raise ValueError("the video has zero frames")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    area, hw = _parse(size)
    f = (frame_count(max_frames) - 1) // 4 + 1
    if hw is None:
        cap, seq_cap = area
        a_z = min(cap, (h_in // 16) * (w_in // 16))
        if a_z < 1:
            raise ValueError(f"the video is {h_in}x{w_in}; it must be at least 16x16 pixels")
        f = max(1, min(f, seq_cap // a_z))
        a = min(a_z, seq_cap // f)
        oh = max(1, round(math.sqrt(a * h_in / w_in)))
        ow = max(1, int(a / oh))
        hw = (16 * oh, 16 * ow)
    frames = 4 * (f - 1) + 1
    if keep_frames:
        return Plan(hw[0], hw[1], n_in, tuple(range(n_in)))
    indices = np.round(np.linspace(0, n_in - 1, frames)).astype(int)
    return Plan(hw[0], hw[1], frames, tuple(int(i) for i in indices))


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> [F, height, width, 3]: bicubic resize by the larger ratio, then a centre crop."""
    from PIL import Image

    f, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (nh - height) // 2, (nw - width) // 2
    out = np.empty((f, height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        im = Image.fromarray(frame)
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.BICUBIC)
        out[i] = np.asarray(im)[top: top + height, left: left + width]
    return out


@dataclasses.dataclass(frozen=True)
class Windows:
    """Overlapping windows over a clip of n frames, padded to `padded` frames by mirroring its end.

    Window i covers frames [starts[i], starts[i] + length); consecutive windows share `overlap` = 4(m - 1) + 1
    frames, which are the first m latent frames of the later window (the causal VAE maps frame 0 to latent 0 and
    frames 4j-3..4j to latent j), so the earlier window's result for them can be re-encoded and pinned.
    """
    n: int
    length: int
    overlap: int
    starts: tuple[int, ...]

    @property
    def padded(self) -> int:
        return self.starts[-1] + self.length

    @property
    def keep_latents(self) -> int:
        return (self.overlap - 1) // 4 + 1


def windows(n: int, max_frames: int = 81, overlap_latents: int | None = None) -> Windows:
    """Windows of at most max_frames (rounded down to 4k + 1) frames, overlapping by 4(m - 1) + 1 frames.

    Default m: a fifth of the window's latent frames (4 of 21 at 81 frames: 13 shared frames), at least 1 and
    leaving at least 1 new latent frame per window.
    """
    if n < 1:
        raise ValueError("the video has zero frames")
    length = frame_count(max_frames)
    if n <= length:  # one window: the smallest 4k + 1 holding the clip, padded
        return Windows(n, frame_count(n + 3), 0, (0,))
    f = (length - 1) // 4 + 1
    if f < 2:
        raise ValueError(f"max_frames {max_frames} leaves windows of one latent frame: chunking needs >= 5 frames")
    m = max(1, f // 5) if overlap_latents is None else int(overlap_latents)
    if not 1 <= m < f:
        raise ValueError(f"overlap of {m} latent frames must be in [1, {f - 1}] for windows of {f} latent frames")
    overlap = 4 * (m - 1) + 1
    stride = length - overlap
    count = 1 + math.ceil((n - length) / stride)
    return Windows(n, length, overlap, tuple(i * stride for i in range(count)))


def mirror_pad(frames: np.ndarray, total: int) -> np.ndarray:
    """Extends [F, ...] to `total` frames by reflecting the end in time (no frozen frames)."""
    f = len(frames)
    if total <= f:
        return frames[:total]
    idx = np.arange(total)
    period = max(1, 2 * (f - 1))
    idx = idx % period if f > 1 else np.zeros_like(idx)
    idx = np.where(idx >= f, period - idx, idx)
    return frames[idx]
