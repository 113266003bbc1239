"""The loss curve as a PNG, drawn without matplotlib: `write_loss_png(path, steps, losses)`.

The curve is rasterised into a uint8 [H, W, 3] image with numpy: axes with "nice" ticks (1, 2 or 5 x 10^k) labelled
in a built-in 3 x 5 bitmap font, the raw logged losses as light dots, a debiased exponential moving average (the
smoothing TensorBoard applies) as a dark line, and a header with the minimum and the last value. imageio writes it
through `files.atomic_write`, so a reader never sees half a PNG.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from pickstyle_jax import files

__all__ = ["Frame", "frame", "smooth", "render", "write_loss_png"]

BACKGROUND, AXES, GRID = (255, 255, 255), (0, 0, 0), (228, 228, 228)
RAW, LINE = (160, 190, 240), (20, 60, 170)
SCALE = 2  # font pixels per glyph pixel: glyphs are 6 x 10 on the image
GAP = 4  # pixels between the y axis and the first step

_GLYPHS = {  # 3 x 5, rows top to bottom, one bit per column
    "0": "111 101 101 101 111", "1": "010 110 010 010 111", "2": "111 001 111 100 111", "3": "111 001 111 001 111",
    "4": "101 101 111 001 001", "5": "111 100 111 001 111", "6": "111 100 111 101 111", "7": "111 001 001 010 010",
    "8": "111 101 111 101 111", "9": "111 101 111 001 111", ".": "000 000 000 000 010", "-": "000 000 111 000 000",
    "+": "000 010 111 010 000", "e": "000 011 111 100 011", "s": "000 011 110 011 110", "t": "010 111 010 010 011",
    "p": "000 111 101 111 100", "l": "110 010 010 010 111", "o": "000 111 101 101 111", "m": "000 111 111 101 101",
    "i": "010 000 010 010 010", "n": "000 110 101 101 101", "a": "000 110 011 101 111", ":": "000 010 000 010 000",
    " ": "000 000 000 000 000",
}
_FONT = {c: np.array([[b == "1" for b in row] for row in g.split()], bool) for c, g in _GLYPHS.items()}


def text_size(s: str) -> tuple[int, int]:
    return 5 * SCALE, max(0, 4 * len(s) - 1) * SCALE


def draw_text(img: np.ndarray, s: str, top: int, left: int, color=AXES) -> None:
    """Draws `s` (characters of the built-in font only) with its top-left corner at (top, left); clipped."""
    for i, ch in enumerate(s):
        glyph = np.kron(_FONT[ch], np.ones((SCALE, SCALE), bool))
        r0, c0 = top, left + 4 * SCALE * i
        r1, c1 = min(r0 + glyph.shape[0], img.shape[0]), min(c0 + glyph.shape[1], img.shape[1])
        if r0 < 0 or c0 < 0 or r1 <= r0 or c1 <= c0:
            continue
        region = img[r0:r1, c0:c1]
        region[glyph[:r1 - r0, :c1 - c0]] = color


def nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About n ticks within [lo, hi] at a step of 1, 2 or 5 x 10^k."""
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
    return np.round(ticks, max(0, -math.floor(math.log10(step))) + 1)


def _label(v: float, step: float) -> str:
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.1e}"


def smooth(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing)."""
    out, acc = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * float(v)
        out[i] = acc / (1 - weight ** (i + 1))
    return out


@dataclasses.dataclass(frozen=True)
class Frame:
    """The plot area [top, bottom] x [left, right] in pixels and the data range it shows; the y axis is drawn
    GAP pixels left of it, so the first point never lands on it."""
    top: int
    bottom: int
    left: int
    right: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def col(self, x):
        return np.rint(self.left + (np.asarray(x, float) - self.x_lo) / (self.x_hi - self.x_lo)
                       * (self.right - self.left)).astype(int)

    def row(self, y):
        return np.rint(self.bottom - (np.asarray(y, float) - self.y_lo) / (self.y_hi - self.y_lo)
                       * (self.bottom - self.top)).astype(int)


def frame(steps, losses, width: int, height: int) -> Frame:
    """Where `render` puts the data: 5 % margins above and below the losses' range, steps edge to edge."""
    x_lo, x_hi = float(np.min(steps)), float(np.max(steps))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = float(np.min(losses)), float(np.max(losses))
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.1 or 1.0
    left = 12 + text_size("-0.00000")[1] + GAP
    return Frame(top=30, bottom=height - 32, left=left, right=width - 20, x_lo=x_lo, x_hi=x_hi, y_lo=y_lo - pad,
                 y_hi=y_hi + pad)


def _segment(img, r0, c0, r1, c1, color):
    n = max(abs(r1 - r0), abs(c1 - c0)) + 1
    rr = np.rint(np.linspace(r0, r1, n)).astype(int)
    cc = np.rint(np.linspace(c0, c1, n)).astype(int)
    for dr in (0, 1):  # two pixels thick
        img[np.clip(rr + dr, 0, img.shape[0] - 1), cc] = color


def render(steps, losses, width: int = 800, height: int = 400, smoothing: float = 0.8) -> np.ndarray:
    """The loss curve as uint8 [height, width, 3] (module docstring)."""
    steps, losses = np.asarray(steps, float), np.asarray(losses, float)
    if steps.ndim != 1 or steps.shape != losses.shape or not len(steps):
        raise ValueError(f"need equal, non-empty 1-D steps and losses, got {steps.shape} and {losses.shape}")
    if not np.isfinite(losses).all():
        raise ValueError("the losses contain NaN or inf")
    fr = frame(steps, losses, width, height)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    for t in nice_ticks(fr.y_lo, fr.y_hi):
        r = int(fr.row(t))
        img[r, fr.left - GAP:fr.right + 1] = GRID
        text = _label(t, (fr.y_hi - fr.y_lo) / 5)
        h, w = text_size(text)
        draw_text(img, text, r - h // 2, fr.left - GAP - 6 - w)
    x_ticks = nice_ticks(fr.x_lo, fr.x_hi, 6)
    for t in x_ticks:
        c = int(fr.col(t))
        img[fr.top:fr.bottom + 1, c] = GRID
        img[fr.bottom:fr.bottom + 5, c] = AXES
        text = _label(t, max(1.0, float(x_ticks[1] - x_ticks[0]) if len(x_ticks) > 1 else 1.0))
        draw_text(img, text, fr.bottom + 8, c - text_size(text)[1] // 2)
    img[fr.top:fr.bottom + 1, fr.left - GAP] = AXES
    img[fr.bottom, fr.left - GAP:fr.right + 1] = AXES
    draw_text(img, "step", height - 12, fr.right - text_size("step")[1])

    cols, rows = fr.col(steps), fr.row(losses)
    for dr in (0, 1):
        for dc in (0, 1):
            img[np.clip(rows + dr, 0, height - 1), np.clip(cols + dc, 0, width - 1)] = RAW
    srows = fr.row(smooth(losses, smoothing))
    for i in range(len(cols) - 1):
        _segment(img, srows[i], cols[i], srows[i + 1], cols[i + 1], LINE)
    if len(cols) == 1:
        img[srows[0]:srows[0] + 2, cols[0]:cols[0] + 2] = LINE
    best = int(np.argmin(losses))
    head = f"loss   min {losses[best]:.4g} at {int(steps[best])}   last {losses[-1]:.4g} at {int(steps[-1])}"
    draw_text(img, head, 8, fr.left)
    return img


def write_loss_png(path, steps, losses, width: int = 800, height: int = 400):
    """render(...) written to `path` as a PNG, atomically; returns the path."""
    import imageio.v3 as iio

    img = render(steps, losses, width, height)
    return files.atomic_write(path, lambda tmp: iio.imwrite(tmp, img))
