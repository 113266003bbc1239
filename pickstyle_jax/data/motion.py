"""Camera-motion augmentation that turns one still image into a clip (docs/REFERENCE.md §8).

`render` reproduces the official PickStyle `VideoAug` on the 81-times repeated image: per frame t (p = t/(T-1)) a
crop window of h_c = int(H/scale) x w_c = int(W/scale) pixels is cut and resized back to H x W with bilinear,
align_corners=False, no antialias (torch `F.interpolate` semantics). `rotate` first rotates the full frame with
torchvision's tensor `rotate` (nearest, fill 0, no expand, counter-clockwise for positive angles) and then centre
crops at the fixed scale 1.5.

Dimension key: T frames, H/W output height/width, C channels (any count: the data pipeline renders the source and
the style image of a pair as one 6-channel image so both get the identical motion at half the indexing cost).

Cost: everything is a separable gather + lerp with index/weight tables (cached per crop size), evaluated once per
*distinct* window (slides repeat windows: int(max_shift p^2) is 0 for the first frames and clamps at the image
border); small clips go through one vectorised pass over all frames, large ones frame by frame in reused per-thread
buffers. Tables follow torch's float32 formulas, so on random images in [-1, 1] the result is within ~1e-5 of torch
at 64x96 and ~6e-5 at 480x832 (about one float32 ulp of the source coordinate times the pixel step), and the
nearest-neighbour rotation indices agree with torch's grid_sample exactly (0 of 7.3M pixels differ).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numpy as np

KINDS = ("static", "zoom_in", "zoom_out", "slide_left", "slide_right", "slide_up", "slide_down", "rotate")
# The official choice list: rotate appears twice, so it is drawn with probability 0.8 * 2/8 = 0.2.
MOVES = ("zoom_in", "zoom_out", "slide_left", "slide_right", "slide_up", "slide_down", "rotate", "rotate")
ROTATE_SCALE = 1.5  # rotate ignores the zoom factor and always crops at this fixed scale


@dataclasses.dataclass(frozen=True)
class MotionParams:
    """One draw of the augmentation; the same params are applied to the source and the style image."""

    kind: str = "static"
    zoom_factor: float = 1.5
    max_shift: int = 150
    max_angle: float = 10.0


def sample_params(rng: np.random.Generator, *, move_prob: float = 0.8, zoom_range=(1.2, 2.0),
                  shift_range=(100, 200), angle_range=(-20.0, 20.0)) -> MotionParams:
    """The official distribution: a move with probability `move_prob`, uniform over `MOVES`; all three magnitudes
    are always drawn (a fixed number of draws keeps the stream layout independent of the kind).
    max_shift is integer-uniform over the inclusive range."""
    move = rng.random() < move_prob
    choice = int(rng.integers(len(MOVES)))
    zoom = float(rng.uniform(*zoom_range))
    shift = int(rng.integers(shift_range[0], shift_range[1] + 1))
    angle = float(rng.uniform(*angle_range))
    return MotionParams(MOVES[choice] if move else "static", zoom, shift, angle)


def windows(kind: str, frames: int, height: int, width: int, zoom_factor: float = 1.5, max_shift: int = 150,
            max_angle: float = 10.0) -> list[tuple[int, int, int, int, float]]:
    """Per frame (top, left, h_c, w_c, angle_degrees): the crop window in the (rotated) frame, as the official
    code computes it (python float64 scalars, `int()` truncation, floor-division centring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown motion kind {kind!r}; expected one of {KINDS}")
    H, W = height, width
    out = []
    for t in range(frames):
        p = t / (frames - 1) if frames > 1 else 0.0
        angle = 0.0
        if kind == "static":
            scale = 1.0
        elif kind == "zoom_in":
            scale = zoom_factor ** p
        elif kind == "zoom_out":
            scale = zoom_factor ** (1.0 - p)
        elif kind == "rotate":
            scale, angle = ROTATE_SCALE, max_angle * p
        else:
            scale = zoom_factor
        h_c, w_c = int(H / scale), int(W / scale)
        top, left = (H - h_c) // 2, (W - w_c) // 2
        shift = int(max_shift * p ** 2)
        if kind == "slide_right":
            left = min(shift, W - w_c)
        elif kind == "slide_left":
            left = max(W - w_c - shift, 0)
        elif kind == "slide_up":
            left, top = W - w_c, max(H - h_c - shift, 0)
        elif kind == "slide_down":
            left, top = W - w_c, min(shift, H - h_c)
        out.append((top, left, h_c, w_c, float(angle)))
    return out


@functools.lru_cache(maxsize=512)
def _linear_table(in_size: int, out_size: int):
    """torch upsample_linear1d indices/weights (align_corners=False), float32 like torch's CPU kernel:
    real = max(in/out * (i + 0.5) - 0.5, 0); i0 = floor(real); i1 = i0 + (i0 < in-1); w1 = real - i0."""
    if in_size == out_size:
        idx = np.arange(out_size, dtype=np.intp)
        return idx, idx, np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    real = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    real = np.maximum(real, np.float32(0.0))
    i0 = np.minimum(np.floor(real).astype(np.intp), in_size - 1)
    w1 = np.clip(real - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, w1


_ARENA = threading.local()


def _scratch(name: str, shape, dtype=np.float32) -> np.ndarray:
    """A reusable per-thread buffer. Fresh multi-megabyte temporaries are mmap-backed and page-fault on every use;
    in a VM that costs more than the arithmetic (measured: ~3k faults and 4x the time per small clip)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    bufs = _ARENA.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[name] = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def _resize_frame(img: np.ndarray, top: int, left: int, h_c: int, w_c: int, H: int, W: int) -> np.ndarray:
    """Bilinear (align_corners=False) resize of img[top:top+h_c, left:left+w_c] (img [*, *, C] C-contiguous) to a
    scratch [H, W*C]: a column gather + lerp over the crop's rows only, then a row gather + lerp."""
    C = img.shape[-1]
    void = np.dtype((np.void, 4 * C))  # one pixel as an opaque item: a gather copies C floats at once
    y0, y1, wy = _linear_table(h_c, H)
    x0, x1, _ = _linear_table(w_c, W)
    band = img.view(void)[top:top + h_c, :, 0]  # [h_c, W_img] pixels
    if w_c == W:
        a = band[:, left:left + W].view(np.float32).reshape(h_c, W * C)
    else:
        a = _scratch("a", (h_c, W * C))
        np.take(band, x0 + left, axis=1, out=a.view(void), mode="clip")
        b = _scratch("b", (h_c, W * C))
        np.take(band, x1 + left, axis=1, out=b.view(void), mode="clip")
        b -= a
        b *= _column_weights(w_c, W, C)
        a += b
    out = _scratch("out", (H, W * C))
    if h_c == H:
        np.copyto(out, a)
        return out
    np.take(a, y0, axis=0, out=out, mode="clip")
    d = _scratch("d", (H, W * C))
    np.take(a, y1, axis=0, out=d, mode="clip")
    d -= out
    d *= wy[:, None]
    out += d
    return out


@functools.lru_cache(maxsize=512)
def _column_weights(in_size: int, out_size: int, C: int) -> np.ndarray:
    # Per-column weights repeated over channels: a long contiguous inner loop instead of a length-C one.
    return np.repeat(_linear_table(in_size, out_size)[2], C)[None, :]


def _rotation_index(H: int, W: int, angle: float, top: int, left: int, h_c: int, w_c: int) -> np.ndarray:
    """Flat source index (iy*W + ix, or H*W for "outside -> fill") of every pixel of the crop window of
    torchvision `rotate(img, angle)` (tensor path, nearest, expand=False, center=None).

    torchvision builds theta = inverse rotation by -(-angle) about the image centre, an output grid at pixel
    centres x = j + 0.5 - W/2, divides theta by (W/2, H/2) to get a normalised grid, and grid_sample
    (align_corners=False, nearest = round half to even, zeros padding) maps it back with (g + 1) * W/2 - 0.5.
    All in float32, mirrored here op by op so that only exact float32 ties could ever round differently.
    """
    rot = math.radians(-angle)  # _get_inverse_affine_matrix(center=[0,0], angle=-angle, ...) at shear 0, scale 1
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    m = np.array([d, -b, 0.0, -c, a, 0.0], np.float32)  # theta rows: [m0 m1 m2; m3 m4 m5], m2 = m5 = 0
    hw = np.array([0.5 * W, 0.5 * H], np.float32)
    r00, r10 = m[0] / hw[0], m[1] / hw[0]  # rescaled_theta = theta^T / [W/2, H/2]
    r01, r11 = m[3] / hw[1], m[4] / hw[1]
    xs = (np.arange(left, left + w_c, dtype=np.float32) + np.float32(0.5 - 0.5 * W))[None, :]
    ys = (np.arange(top, top + h_c, dtype=np.float32) + np.float32(0.5 - 0.5 * H))[:, None]
    gx = xs * r00 + ys * r10
    gy = xs * r01 + ys * r11
    ix = np.rint((gx + np.float32(1.0)) * np.float32(0.5 * W) - np.float32(0.5))
    iy = np.rint((gy + np.float32(1.0)) * np.float32(0.5 * H) - np.float32(0.5))
    inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    return np.where(inside, iy.astype(np.intp) * W + ix.astype(np.intp), H * W)


# Clips up to this many floats (distinct windows x H x W x C) are rendered in one vectorised pass over all frames
# (small clips: per-call overhead dominates); larger ones frame by frame in reused buffers (arithmetic dominates).
VECTORISE_FLOATS = 1 << 21


def _render_blocks(image: np.ndarray, plan, fill: float):
    """Renders each distinct window of `plan` once. Yields (frames [m], sources [m], block float32 [k, H, W*C]):
    frame frames[i] of the clip is block[sources[i]]. Blocks live in per-thread scratch buffers: consume each
    before the next iteration."""
    H, W, C = image.shape
    image = np.ascontiguousarray(image, np.float32)
    groups: dict[tuple, list[int]] = {}
    for t, win in enumerate(plan):
        groups.setdefault(win, []).append(t)
    wins = list(groups)
    void = np.dtype((np.void, 4 * C))
    padded = None
    if any(win[4] != 0.0 for win in wins):  # one extra "pixel" holding the fill value for out-of-frame samples
        padded = _scratch("padded", (H * W + 1, C))
        padded[:-1] = image.reshape(H * W, C)
        padded[-1] = fill
        padded = padded.view(void)[:, 0]
    if len(wins) * H * W * C <= VECTORISE_FLOATS:
        frames = np.array([t for ts in groups.values() for t in ts])
        sources = np.array([u for u, ts in enumerate(groups.values()) for _ in ts])
        yield frames, sources, _render_all(image, wins, padded)
        return
    for (top, left, h_c, w_c, angle), ts in groups.items():
        if angle == 0.0:
            frame = _resize_frame(image, top, left, h_c, w_c, H, W)
        else:
            crop = _scratch("crop", (h_c, w_c, C))
            np.take(padded, _rotation_index(H, W, angle, top, left, h_c, w_c), out=crop.view(void)[..., 0],
                    mode="clip")
            frame = _resize_frame(crop, 0, 0, h_c, w_c, H, W)
        yield np.array(ts), np.zeros(len(ts), np.intp), frame[None]


def _render_all(image: np.ndarray, wins, padded) -> np.ndarray:
    """All windows at once -> scratch float32 [n, H, W*C]: the same separable bilinear (rows, then columns) with
    the windows' index tables stacked, so the number of numpy calls does not grow with the frame count."""
    H, W, C = image.shape
    n = len(wins)
    void = np.dtype((np.void, 4 * C))
    if padded is not None:  # rotation: gather every window's (rotated) crop first; rotate crops share one size
        h_c, w_c = wins[0][2], wins[0][3]
        if any((w[2], w[3]) != (h_c, w_c) for w in wins):
            raise ValueError("rotated windows must share one crop size")
        idx = _scratch("rot_idx", (n, h_c, w_c), np.intp)
        for u, (top, left, _, _, angle) in enumerate(wins):
            if angle != 0.0:
                idx[u] = _rotation_index(H, W, angle, top, left, h_c, w_c)
            else:
                idx[u] = (top + np.arange(h_c))[:, None] * W + (left + np.arange(w_c))[None, :]
        crops = _scratch("crops", (n, h_c, w_c), void)
        np.take(padded, idx, out=crops, mode="clip")
        rows = crops.view(np.float32).reshape(n * h_c, w_c * C)
        row_off, col_off, width = np.arange(n) * h_c, np.zeros(n, np.intp), w_c
    else:
        rows = image.reshape(H, W * C)
        row_off, col_off, width = np.array([w[0] for w in wins]), np.array([w[1] for w in wins]), W
    ys = [_linear_table(w[2], H) for w in wins]
    xs = [_linear_table(w[3], W) for w in wins]
    a = _scratch("a", (n * H, width * C))
    d = _scratch("b", (n * H, width * C))
    np.take(rows, (row_off[:, None] + np.stack([y[0] for y in ys])).ravel(), axis=0, out=a, mode="clip")
    np.take(rows, (row_off[:, None] + np.stack([y[1] for y in ys])).ravel(), axis=0, out=d, mode="clip")
    d -= a
    d *= np.concatenate([y[2] for y in ys])[:, None]
    a += d
    flat = a.view(void).reshape(-1)
    base = (np.arange(n * H) * width).reshape(n, H, 1)
    cols = _scratch("cols", (n, H, W), np.intp)
    out = _scratch("out", (n, H, W * C))
    d = _scratch("d", (n, H, W * C))
    np.add(base, (col_off[:, None] + np.stack([x[0] for x in xs]))[:, None, :], out=cols)
    np.take(flat, cols, out=out.view(void), mode="clip")
    np.add(base, (col_off[:, None] + np.stack([x[1] for x in xs]))[:, None, :], out=cols)
    np.take(flat, cols, out=d.view(void), mode="clip")
    d -= out
    d *= np.stack([np.repeat(x[2], C) for x in xs])[:, None, :]
    out += d
    return out


def render(image: np.ndarray, kind: str, frames: int = 81, zoom_factor: float = 1.5, max_shift: int = 150,
           max_angle: float = 10.0, *, fill: float = 0.0) -> np.ndarray:
    """image [H, W, C] float in [-1, 1] at output size -> clip [frames, H, W, C] float32.

    `fill` is the value rotated-in corners take (0 = the official fill, mid-grey in [-1, 1])."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"render expects an [H, W, C] image, got shape {image.shape}")
    H, W, C = image.shape
    plan = windows(kind, frames, H, W, zoom_factor, max_shift, max_angle)
    out = np.empty((frames, H, W, C), np.float32)
    for ts, src, block in _render_blocks(image, plan, fill):
        out[ts] = block.reshape(-1, H, W, C)[src]
    return out


def render_uint8(image: np.ndarray, params: MotionParams, frames: int, *, splits=None):
    """Renders an image in [0, 255] float units (unclamped, e.g. straight from a bicubic resize) and rounds it to
    uint8 (clip to [0, 255], round half up). Equivalent to quantising the official [-1, 1] clip with
    x -> (x + 1) * 127.5; the rotate fill (0 in [-1, 1]) is 127.5 here and so becomes 128.

    `splits` (channel counts, e.g. (3, 3)) returns one contiguous uint8 clip per channel group instead of one.
    """
    image = np.asarray(image, np.float32)
    H, W, C = image.shape
    splits = tuple(splits) if splits else (C,)
    if sum(splits) != C:
        raise ValueError(f"splits {splits} do not add up to {C} channels")
    outs = [np.empty((frames, H, W, n), np.uint8) for n in splits]
    plan = windows(params.kind, frames, H, W, params.zoom_factor, params.max_shift, params.max_angle)
    # +0.5 before rendering (bilinear weights sum to 1, nearest copies) turns the final cast's truncation into
    # round-half-up, so quantisation is one clip and one cast.
    shifted = _scratch("shifted", image.shape)
    np.add(image, np.float32(0.5), out=shifted)
    edges = np.cumsum((0,) + splits)
    for ts, src, block in _render_blocks(shifted, plan, fill=128.0):
        np.clip(block, 0.0, 255.0, out=block)
        k = block.shape[0]
        u8 = _scratch("u8", (k, H, W, C), np.uint8)
        np.copyto(u8.reshape(block.shape), block, casting="unsafe")
        if len(outs) == 1:
            parts = [u8]
        elif len(set(splits)) == 1:  # equal groups: move opaque n-byte pixels rather than single bytes
            item = np.dtype((np.void, splits[0]))
            parts = []
            for g in range(len(splits)):
                part = _scratch(f"u8_{g}", (k, H, W, splits[0]), np.uint8)
                np.copyto(part.view(item)[..., 0], u8.view(item)[..., g])
                parts.append(part)
        else:
            parts = [u8[..., lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
        for out, part in zip(outs, parts):
            for t, u in zip(ts, src):  # whole-frame copies; repeated windows are rendered once
                out[t] = part[u]
    return outs if len(outs) > 1 else outs[0]
