"""Frame count, frame rate and frame size of a stylisation, and the windows of a long video (host-side numpy, no
JAX).

Size (the official rule, Wan VACE at 480p): the output keeps the source's aspect ratio under an area cap of
480*832 pixels = 1560 units of 16x16 (one unit = one DiT token per latent frame), and the DiT sequence is capped at
32,760 tokens (= 1560 * 21 latent frames):
    a_z = min(cap, (H_in // 16) * (W_in // 16)),   f = min((max_frames - 1) // 4 + 1, seq_cap // a_z)
    A'  = min(a_z, seq_cap // f),   oh = round(sqrt(A' * H_in / W_in)),   ow = int(A' / oh)
giving 16*oh x 16*ow pixels and windows of L = 4(f - 1) + 1 frames (the causal VAE encodes 1 + 4k frames).
16:9 -> 480x832, 9:16 -> 848x464, square -> 624x640. Inputs under the cap keep their size (cropped to 16-multiples).
"720p" is the same rule with 1280*720 pixels (3600 units, 75,600 tokens). The frames are resized bicubically by the
larger of the two ratios and centre-cropped.

Time: by default, and with long "chunked", the output lasts as long as the source (n_in frames at fps_in; an unknown
rate is taken as the model's MODEL_FPS = 16, Wan's sample_fps) and is written at the rate that makes that exact,
fps_out = F * fps_in / n_in. Only the opt-in official rule changes the duration, as the paper's pipeline does.
- frame_rule "keep" (the default): the clip is resampled to the model's 16 fps, x = n_in * 16 / fps_in frames. If
  the 4k + 1 nearest to x fits one window (<= L) that is the frame count F (at most 2 frames from x); else F = round(x)
  frames in overlapping windows of L. A long clip is windowed rather than refused: its whole duration is what was
  asked for, and windows cost time in proportion to it.
- long "chunked": every source frame is kept (F = n_in, fps_out = fps_in), in overlapping windows of
  min(L, largest 4k + 1 <= n_in) frames; the source's own rate, e.g. for a 30 fps clip whose motion should stay
  30 fps.
- frame_rule "official" (what the paper's numbers used): F = L frames (81), round(linspace(0, n_in - 1, F)),
  whatever the clip's length, written at 16 fps (5.06 s): short clips are stretched by repeating frames, long ones
  sampled sparsely.
Resampled frames are centre-aligned: output frame j shows the source frame under its centre,
floor((j + 1/2) * n_in / F), so a clip kept at its rate maps frame j to frame j.

Windows (`windows`): consecutive windows share at least 4(m - 1) + 1 frames (m = a fifth of a window's latent
frames by default); the last window ends at the clip's last frame, so it overlaps its predecessor more instead of
running past the end: no frame is invented.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

__all__ = ["Plan", "plan", "frame_count", "nearest_frame_count", "resize_crop", "Windows", "windows", "MODEL_FPS",
           "FRAME_RULES"]

_AREAS = {"480p": (480 * 832 // 256, 32760), "720p": (1280 * 720 // 256, 75600)}
MODEL_FPS = 16.0  # Wan's sample_fps: the rate the DiT was trained and samples at
FRAME_RULES = ("keep", "official")


@dataclasses.dataclass(frozen=True)
class Windows:
    """Overlapping windows of `length` frames over a clip of n frames; the last one ends at frame n - 1.

    Window i covers frames [starts[i], starts[i] + length). Window i > 0 shares `shared(i)` >= `overlap` frames with
    window i - 1; the first `keep(i)` latent frames of window i (frames starts[i] .. starts[i] + pinned(i) - 1: the
    causal VAE maps frame 0 to latent 0 and frames 4j-3..4j to latent j) lie inside that shared part, so the
    result already made for them can be re-encoded and pinned (`keep_latents`).
    """
    n: int
    length: int
    overlap: int  # frames regular neighbours share, 4(m - 1) + 1 (0: one window)
    starts: tuple[int, ...]

    @property
    def keep_latents(self) -> int:
        """m: latent frames pinned between regular neighbours."""
        return (self.overlap - 1) // 4 + 1 if self.overlap else 0

    def shared(self, i: int) -> int:
        return self.starts[i - 1] + self.length - self.starts[i] if i else 0

    def keep(self, i: int) -> int:
        """Latent frames of window i pinned to the result so far: every whole latent inside the shared frames, at
        least one new latent frame left (so >= m, and more for the end-aligned last window)."""
        return min((self.shared(i) - 1) // 4 + 1, (self.length - 1) // 4) if i else 0

    def pinned(self, i: int) -> int:
        """Frames of window i covered by its pinned latents: 4(keep - 1) + 1 (0 for the first window)."""
        return 4 * (self.keep(i) - 1) + 1 if i else 0


@dataclasses.dataclass(frozen=True)
class Plan:
    height: int
    width: int
    frames: int  # output frames
    indices: tuple[int, ...]  # source frame of every output frame
    fps: float  # output frame rate: frames / fps is the source's duration (16 under the official rule)
    windows: Windows  # how the output frames are sampled: one window of `frames` (4k + 1) or several
    frame_rule: str = "keep"

    @property
    def latent_frames(self) -> int:
        """Latent frames of one window (what the DiT sees at a time)."""
        return (self.windows.length - 1) // 4 + 1


def frame_count(n: int) -> int:
    """Largest 4k + 1 <= n (at least 1)."""
    return 4 * ((max(1, int(n)) - 1) // 4) + 1


def nearest_frame_count(x: float) -> int:
    """The 4k + 1 nearest to x (at least 1; a tie goes up, keeping more of the clip)."""
    return 4 * max(0, math.floor((float(x) - 1) / 4 + 0.5)) + 1


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


def _window_and_size(h_in, w_in, size, max_frames):
    """(window length L = 4k + 1, height, width) of the spatial rule above."""
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
    return 4 * (f - 1) + 1, hw[0], hw[1]


def _centred(n_in: int, frames: int) -> tuple[int, ...]:
    """Source frame under the centre of each of `frames` output frames spanning the same duration (exact ints)."""
    return tuple(min(n_in - 1, (2 * j + 1) * n_in // (2 * frames)) for j in range(frames))


def plan(n_in: int, h_in: int, w_in: int, *, size="480p", max_frames: int = 81, fps: float | None = None,
         frame_rule: str = "keep", long: str | None = None) -> Plan:
    """Output size, frame count, frame rate, source frame indices and windows for a source of n_in frames of
    h_in x w_in pixels at `fps` (None: unknown, taken as MODEL_FPS). See the module docstring for the rules."""
    if n_in < 1:
        raise ValueError("the video has zero frames")
    if frame_rule not in FRAME_RULES:
        raise ValueError(f"frame_rule must be one of {FRAME_RULES}, got {frame_rule!r}")
    if long not in (None, "chunked"):
        raise ValueError(f"long must be None or 'chunked', got {long!r}")
    if frame_rule == "official" and long:
        raise ValueError("--frame-rule official resamples every clip to one window of --max-frames frames (the "
                         "paper's rule); it cannot be combined with --long chunked")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps}")
    fps_in = MODEL_FPS if fps is None else float(fps)
    length, height, width = _window_and_size(h_in, w_in, size, max_frames)
    if frame_rule == "official":
        indices = tuple(int(i) for i in np.round(np.linspace(0, n_in - 1, length)))
        win = Windows(length, length, 0, (0,))
    elif long == "chunked":
        indices, win = tuple(range(n_in)), windows(n_in, length)
    else:
        x = n_in * MODEL_FPS / fps_in
        frames = nearest_frame_count(x)
        if frames <= length:
            win = Windows(frames, frames, 0, (0,))
        else:
            frames = max(length, round(x))
            win = windows(frames, length)
        indices = _centred(n_in, frames)
    fps_out = MODEL_FPS if frame_rule == "official" else len(indices) * fps_in / n_in
    return Plan(height, width, len(indices), indices, fps_out, win, frame_rule)


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


def windows(n: int, max_frames: int = 81, overlap_latents: int | None = None) -> Windows:
    """Windows of L = min(largest 4k + 1 <= max_frames, largest 4k + 1 <= n) frames over n frames, consecutive ones
    overlapping by at least 4(m - 1) + 1 frames, the last one ending at frame n - 1 (it starts earlier than the
    regular stride would put it, so it overlaps its predecessor more; nothing is padded).

    Default m: a fifth of the window's latent frames (4 of 21 at 81 frames: 13 shared frames), at least 1 and
    leaving at least 1 new latent frame per window.
    """
    if n < 1:
        raise ValueError("the video has zero frames")
    length = min(frame_count(max_frames), frame_count(n))
    if n == length:
        return Windows(n, n, 0, (0,))
    f = (length - 1) // 4 + 1
    if f < 2:
        raise ValueError(f"windows of {length} frame cover {n} frames only frame by frame: overlapping windows need "
                         f">= 5 frames each (--max-frames >= 5 and a clip of >= 5 frames)")
    m = max(1, f // 5) if overlap_latents is None else int(overlap_latents)
    if not 1 <= m < f:
        raise ValueError(f"overlap of {m} latent frames must be in [1, {f - 1}] for windows of {f} latent frames")
    overlap = 4 * (m - 1) + 1
    stride = length - overlap
    count = 1 + math.ceil((n - length) / stride)
    return Windows(n, length, overlap, tuple(i * stride for i in range(count - 1)) + (n - length,))
