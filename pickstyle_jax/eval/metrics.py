"""Video metrics for style transfer: fidelity to a ground truth, temporal stability, content and style.

Every function takes videos `[F, H, W, 3]` (one clip; F frames) as uint8 in [0, 255] or as float in [-1, 1] (the
project's pixel convention; anything outside [-1, 1] is an error, so a [0, 255] float array cannot slip through as
if it were [-1, 1]). Internally pixels are mapped to [0, 1], so every intensity error below is in units of the
full range (0.01 = 2.55 grey levels). All functions are vectorised numpy; the filters run a few frames at a time,
so memory stays a small multiple of the clips' float32 size (0.4 GB for one 81 x 480 x 832 clip).

Metrics (range, direction: definition):

- `psnr` ([0, 100] dB, higher better): per frame 10 log10(1 / MSE) over pixels and channels, averaged over frames.
  MSE is floored at 1e-10, so identical frames give exactly PSNR_CAP = 100 dB (finite, so results stay JSON).
- `ssim` ([-1, 1], higher better): Wang et al. 2004 per frame and RGB channel, 11 x 11 Gaussian window (sigma
  1.5), C1 = (0.01 L)^2 and C2 = (0.03 L)^2 with L = 1 (the [0, 1] range), population (not sample) moments; the
  mean over the valid (unpadded) window positions, then over channels and frames. Frames need >= 11 pixels a side.
- `temporal_error` ([0, 1], lower better): mean over t and over the pixels valid under the warp of
  |x[t+1] - warp(x[t])| (channels averaged). warp samples frame t bilinearly at the known backward motion: for
  every pixel of frame t+1, the position in frame t it came from (the demo's `demo.world` gives it exactly; without
  ground truth, `source_motion` estimates the source's global motion and keeps the pixels it explains).
- `flicker` ([0, 1], lower better): mean |d[t] - s[t]| over t, pixels and channels, with d[t] = x[t+1] - x[t]
  of the stylised clip and s[t] the same for its source: change the source has is not penalised, change it lacks
  is. A stylisation that changes colours has flicker > 0 even when perfect (its frame differences have other
  colours), so compare rows (and the ground truth's own value), not against 0.
- `content` ([0, 1], higher better): edge agreement with the source. Per frame the F1 score of thin binary edge
  maps (Canny-like: Gaussian blur sigma 1; per pixel the RGB channel with the strongest Sobel gradient, so
  boundaries of equal brightness but different hue count; non-maximum suppression across the edge; magnitude
  above max(0.25 * the frame's maximum, 0.02)) with a 2-pixel tolerance (a stylised edge counts if a source edge
  lies within 2 pixels, and vice versa: an outline drawn along a boundary has both its flanks within that
  distance); averaged over frames. Two empty maps agree (1); one empty map scores 0.
- `style_distance` ([0, 1], lower better): distance of a clip's style statistics to a reference set of frames in
  the target style: pooled 16-bin histograms of the channel values (R, G, B together), of luma and saturation, of
  the Sobel gradient magnitude and of the absolute Laplacian (log-spaced bins), compared by earth mover's distance
  (luma, saturation) or total variation (the rest), averaged. It measures tones, colourfulness, flatness and
  line/texture statistics, not hue or layout (those belong to the scene), so the reference set should be other
  scenes in the style. On the synthetic world, other scenes of a style are nearer than the same scenes in any
  other style or unstylised, for every style.

Embedding metrics (`frame_consistency`, `text_video_score`) live in `features.py`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["to_unit", "psnr", "ssim", "temporal_error", "warp", "translations", "source_motion", "STILL_TOL", "flicker", "edge_map", "content", "style_stats",
           "style_distance", "PSNR_CAP"]

STILL_TOL = 4.0 / 255  # source_motion: a pixel follows the motion if no channel errs by more (H.264 noise stays below)
PSNR_CAP = 100.0  # dB: the value for identical frames (MSE floored at 1e-10)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
EDGE_SIGMA, EDGE_REL, EDGE_ABS, EDGE_TOL = 1.0, 0.25, 0.02, 2
_CHUNK = 8  # frames per pass of the per-pixel filters (bounds memory on long clips)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def to_unit(video, name: str = "video") -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] -> float32 in [0, 1]; shape checked to be [F, H, W, 3]."""
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"{name} must be [frames, height, width, 3], got shape {v.shape}")
    if v.dtype == np.uint8:
        return v.astype(np.float32) / 255.0
    if not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 [0, 255] or float [-1, 1], got dtype {v.dtype}")
    v = v.astype(np.float32)
    lo, hi = float(v.min(initial=0.0)), float(v.max(initial=0.0))
    if lo < -1.001 or hi > 1.001 or not np.isfinite(v).all():
        raise ValueError(f"float {name} must be in [-1, 1] (the project's pixel range), got [{lo:.3g}, {hi:.3g}]; "
                         f"pass uint8 for [0, 255] pixels")
    return np.clip((v + 1.0) * 0.5, 0.0, 1.0)


def _pair(a, b, names=("prediction", "target")):
    x, y = to_unit(a, names[0]), to_unit(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} {x.shape} and {names[1]} {y.shape} must have the same shape")
    return x, y


def psnr(pred, target) -> float:
    """Mean over frames of the per-frame PSNR in dB (peak 1 on the [0, 1] scale), capped at PSNR_CAP."""
    x, y = _pair(pred, target)
    mse = np.mean((x - y) ** 2, axis=(1, 2, 3), dtype=np.float64)
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


# ---------------------------------------------------------------------------------------------------------------
# Separable filters on [N, H, W, C] arrays (loops over taps, not pixels: one array-sized temporary per tap).

def _gaussian(sigma: float, radius: int) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float64) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _conv_valid(x, k, axis):
    n = x.shape[axis] - len(k) + 1
    out = k[0] * np.take(x, np.arange(0, n), axis=axis)
    for i in range(1, len(k)):
        out += k[i] * np.take(x, np.arange(i, i + n), axis=axis)
    return out


def _conv_same(x, k, axis):
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    return _conv_valid(np.pad(x, pad, mode="edge"), k, axis)


def _blur_valid(x, k):
    return _conv_valid(_conv_valid(x, k, 1), k, 2)


def ssim(pred, target) -> float:
    """Mean SSIM over frames (Gaussian window; constants in the module docstring). Frames must be >= 11 pixels."""
    x, y = _pair(pred, target)
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {x.shape[1:3]}")
    k = _gaussian(SSIM_SIGMA, SSIM_WINDOW // 2)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    per_frame = []
    for s in range(0, x.shape[0], _CHUNK):
        a, b = x[s:s + _CHUNK], y[s:s + _CHUNK]
        mu_a, mu_b = _blur_valid(a, k), _blur_valid(b, k)
        var_a = _blur_valid(a * a, k) - mu_a ** 2
        var_b = _blur_valid(b * b, k) - mu_b ** 2
        cov = _blur_valid(a * b, k) - mu_a * mu_b
        m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        per_frame.append(m.mean(axis=(1, 2, 3), dtype=np.float64))
    return float(np.mean(np.concatenate(per_frame)))


# ---------------------------------------------------------------------------------------------------------------
# Motion-compensated temporal error.

def warp(frame, coords) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear backward warp of one frame: out[p] = frame[coords[p]].

    frame [H, W, C] float; coords [H', W', 2] = (y, x) in frame pixels (pixel centres at integers). Returns (out
    [H', W', C], inside [H', W'] bool: the coordinate lies within [0, H-1] x [0, W-1]; elsewhere `out` holds the
    clamped border value)."""
    h, w = frame.shape[:2]
    cy, cx = coords[..., 0], coords[..., 1]
    inside = (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
    cy, cx = np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)
    y0 = np.clip(np.floor(cy).astype(np.int32), 0, max(h - 2, 0))
    x0 = np.clip(np.floor(cx).astype(np.int32), 0, max(w - 2, 0))
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (cy - y0)[..., None], (cx - x0)[..., None]
    top = frame[y0, x0] * (1 - fx) + frame[y0, x1] * fx
    bot = frame[y1, x0] * (1 - fx) + frame[y1, x1] * fx
    return top * (1 - fy) + bot * fy, inside


def temporal_error(video, flow, valid=None) -> float:
    """Mean abs(x[t+1] - warp(x[t], flow[t])) over t and valid pixels, channels averaged, in [0, 1] units.

    flow [F-1, H, W, 2]: for every pixel of frame t+1 the (y, x) position in frame t it came from (the world's known
    motion). valid [F-1, H, W] bool (optional): pixels whose motion is well defined (not occluded, not on a motion
    boundary); pixels warped from outside the frame are always excluded. NaN if no pixel is valid (or F = 1)."""
    x = to_unit(video)
    f, h, w, _ = x.shape
    flow = np.asarray(flow, np.float32)
    if flow.shape != (f - 1, h, w, 2):
        raise ValueError(f"flow must be [frames - 1, height, width, 2] = {(f - 1, h, w, 2)}, got {flow.shape}")
    if valid is not None:
        valid = np.asarray(valid, bool)
        if valid.shape != (f - 1, h, w):
            raise ValueError(f"valid must be [frames - 1, height, width] = {(f - 1, h, w)}, got {valid.shape}")
    total, count = 0.0, 0
    for t in range(f - 1):
        warped, inside = warp(x[t], flow[t])
        m = inside if valid is None else inside & valid[t]
        total += float(np.abs(x[t + 1] - warped).mean(-1)[m].sum(dtype=np.float64))
        count += int(m.sum())
    return total / count if count else float("nan")


def translations(a, b, k: int = 3) -> list[tuple[int, int]]:
    """The k likeliest integer shifts (dy, dx) with b[p] ~ a[p - (dy, dx)] between two frames [H, W]: the highest
    peaks of the phase correlation of the Hann-windowed frames, best first (|dy| <= H/2, |dx| <= W/2)."""
    h, w = a.shape
    win = np.outer(np.hanning(h), np.hanning(w)) if min(h, w) > 2 else np.ones((h, w))
    fa, fb = np.fft.rfft2((a - a.mean()) * win), np.fft.rfft2((b - b.mean()) * win)
    cross = fb * np.conj(fa)
    r = np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-12), s=(h, w))
    peaks = np.argsort(r, axis=None)[::-1][:k]
    return [(int(dy - h if dy > h // 2 else dy), int(dx - w if dx > w // 2 else dx))
            for dy, dx in zip(*np.unravel_index(peaks, r.shape))]


def source_motion(source, tol: float = STILL_TOL) -> tuple[np.ndarray, np.ndarray]:
    """(flow, valid) for `temporal_error` when the true motion is not known: per frame pair one global translation
    of the source (a still or panning camera), flow [F-1, H, W, 2] as `temporal_error` takes it, valid [F-1, H, W]
    where that motion explains the source: the warped frame t matches frame t+1 within `tol` on every channel ([0, 1]
    units). The translation is the one explaining the most pixels among no motion and the best `translations` of
    the luma; so under a still camera the valid pixels are those the source holds still. Objects that move on their
    own, occlusions and pixels from outside the frame are left out. Where the source follows the motion, the
    stylisation should too."""
    s = to_unit(source, "source")
    f, h, w, _ = s.shape
    grid = np.stack(np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"), -1)
    flows, valids = [np.zeros((0, h, w, 2), np.float32)], [np.zeros((0, h, w), bool)]
    for t in range(f - 1):
        best = None
        for d in dict.fromkeys([(0, 0), *translations(_luma(s[t]), _luma(s[t + 1]))]):
            coords = grid - np.array(d, np.float32)  # pixel p of frame t+1 shows what frame t had at p - d
            warped, inside = warp(s[t], coords)
            ok = inside & (np.abs(s[t + 1] - warped).max(-1) <= tol)
            if best is None or ok.sum() > best[1].sum():
                best = (coords, ok)
        flows.append(best[0][None])
        valids.append(best[1][None])
    return np.concatenate(flows), np.concatenate(valids)


def flicker(video, source) -> float:
    """Mean abs((x[t+1] - x[t]) - (s[t+1] - s[t])) over t, pixels and channels ([0, 1] units; 0 for F = 1)."""
    x, s = _pair(video, source, ("video", "source"))
    if x.shape[0] < 2:
        return 0.0
    return float(np.mean(np.abs(np.diff(x, axis=0) - np.diff(s, axis=0)), dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------------
# Content: edge-map agreement.

def _sobel(g):
    """g [N, H, W] -> (gy, gx), Sobel normalised so a unit ramp of slope 1 per pixel gives 1 (edge-padded)."""
    d, s = np.array([-0.5, 0.0, 0.5], np.float32), np.array([0.25, 0.5, 0.25], np.float32)
    g = g[..., None]
    gy = _conv_same(_conv_same(g, d, 1), s, 2)[..., 0]
    gx = _conv_same(_conv_same(g, s, 1), d, 2)[..., 0]
    return gy, gx


def _luma(x):
    return np.tensordot(x, _LUMA, axes=([-1], [0])).astype(np.float32)


def edge_map(video) -> np.ndarray:
    """bool [F, H, W]: thin edges (see `content`; threshold max(EDGE_REL * frame max, EDGE_ABS))."""
    return _edges(to_unit(video))


def _edges(x):
    """Canny-like edges without hysteresis: blur, colour Sobel, non-maximum suppression along the gradient direction
    (quantised to 4 directions), then the magnitude threshold. Edges come out about 1 px thin, so the tolerance of
    `content` is meaningful; taking the strongest channel keeps boundaries of equal brightness but different hue."""
    k = _gaussian(EDGE_SIGMA, 3)
    out = []
    for s in range(0, x.shape[0], _CHUNK):
        g = _conv_same(_conv_same(x[s:s + _CHUNK], k, 1), k, 2)  # [n, H, W, 3]
        gy, gx = _sobel(np.moveaxis(g, -1, 1).reshape(-1, *g.shape[1:3]))
        gy, gx = (a.reshape(g.shape[0], 3, *g.shape[1:3]) for a in (gy, gx))
        # colour edges: per pixel the channel with the strongest gradient (iso-luminant boundaries count too)
        pick = np.argmax(gy * gy + gx * gx, axis=1)[:, None]
        gy, gx = np.take_along_axis(gy, pick, 1)[:, 0], np.take_along_axis(gx, pick, 1)[:, 0]
        mag = np.sqrt(gy * gy + gx * gx)
        direction = np.round(np.arctan2(gy, gx) / (np.pi / 4)).astype(np.int32) % 4  # 0: x, 1: diag, 2: y, 3: anti
        p = np.pad(mag, ((0, 0), (1, 1), (1, 1)))
        h, w = mag.shape[1:]
        keep = np.zeros(mag.shape, bool)
        for d, (oy, ox) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
            a = p[:, 1 + oy:1 + oy + h, 1 + ox:1 + ox + w]
            b = p[:, 1 - oy:1 - oy + h, 1 - ox:1 - ox + w]
            keep |= (direction == d) & (mag >= a) & (mag >= b)
        thr = np.maximum(EDGE_REL * mag.max(axis=(1, 2), keepdims=True), EDGE_ABS)
        out.append(keep & (mag > thr))
    return np.concatenate(out)


def _dilate(m, r: int):
    """Binary dilation of [N, H, W] by a (2r+1)^2 square."""
    out = m.copy()
    h, w = m.shape[1:]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy == dx == 0:
                continue
            src = m[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            out[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)] |= src
    return out


def content(video, source) -> float:
    """Mean over frames of the edge-map F1 between the clip and its source, with EDGE_TOL pixels of tolerance."""
    x, s = _pair(video, source, ("video", "source"))
    ex, es = _edges(x), _edges(s)
    dx, ds = _dilate(ex, EDGE_TOL), _dilate(es, EDGE_TOL)
    nx, ns = ex.sum(axis=(1, 2)), es.sum(axis=(1, 2))
    precision = (ex & ds).sum(axis=(1, 2)) / np.maximum(nx, 1)
    recall = (es & dx).sum(axis=(1, 2)) / np.maximum(ns, 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    f1 = np.where((nx == 0) & (ns == 0), 1.0, f1)
    return float(f1.mean())


# ---------------------------------------------------------------------------------------------------------------
# Style statistics against a reference set.

_STYLE_BINS = 16
_LINEAR_EDGES = np.linspace(0.0, 1.0, _STYLE_BINS + 1)
_LOG_EDGES = np.concatenate([[0.0], np.logspace(-3, 0, _STYLE_BINS)])  # responses span decades: flat to outline


def _hist(v, edges):
    c, _ = np.histogram(np.clip(v, edges[0], edges[-1]), edges)
    return c.astype(np.float64)


def _emd(a, b) -> float:
    """Earth mover's distance of two histograms on equal-width bins, in units of the whole range: in [0, 1]."""
    return float(np.abs(np.cumsum(a) - np.cumsum(b)).sum() / (len(a) - 1))


def _tv(a, b) -> float:
    return 0.5 * float(np.abs(a - b).sum())


# statistic -> how two of its histograms are compared: EMD where a small shift of the values is a small change of
# style (brightness, saturation), total variation where bins are categories (the posterisation levels of
# "channels", the decades of the filter responses)
_STYLE_COMPARE = {"channels": _tv, "luma": _emd, "saturation": _emd, "gradient": _tv, "laplacian": _tv}


def style_stats(frames) -> dict:
    """Pooled 16-bin histograms of frames [N, H, W, 3], each summing to 1: "channels" (R, G and B values pooled),
    "luma", "saturation" (max - min of RGB), all on [0, 1]; "gradient" (Sobel magnitude of luma) and "laplacian"
    (its absolute Laplacian) on log-spaced bins from 1e-3 to 1. Tones, colourfulness, flatness and line/texture
    statistics are what a style sets; hues and layout belong to the scene, so they are left out. Pool several clips
    by concatenating their frames."""
    x = to_unit(frames, "frames")
    acc = {k: np.zeros(_STYLE_BINS) for k in _STYLE_COMPARE}
    lap_k = np.array([1.0, -2.0, 1.0], np.float32)
    for s in range(0, x.shape[0], _CHUNK):
        c = x[s:s + _CHUNK]
        g = _luma(c)
        gy, gx = _sobel(g)
        lap = _conv_same(g[..., None], lap_k, 1)[..., 0] + _conv_same(g[..., None], lap_k, 2)[..., 0]
        acc["channels"] += _hist(c, _LINEAR_EDGES)
        acc["luma"] += _hist(g, _LINEAR_EDGES)
        acc["saturation"] += _hist(c.max(-1) - c.min(-1), _LINEAR_EDGES)
        acc["gradient"] += _hist(np.sqrt(gy * gy + gx * gx), _LOG_EDGES)
        acc["laplacian"] += _hist(np.abs(lap), _LOG_EDGES)
    return {k: v / max(v.sum(), 1.0) for k, v in acc.items()}


def style_distance(video, reference) -> float:
    """Mean over the `style_stats` histograms of their distance to the reference's (EMD for luma and saturation,
    total variation for the others), in [0, 1]; 0: the reference's statistics. `reference` is a frame array
    [N, H, W, 3] (the style's reference set) or its precomputed `style_stats`."""
    a = style_stats(video)
    b = reference if isinstance(reference, dict) else style_stats(reference)
    return float(np.mean([cmp(a[k], b[k]) for k, cmp in _STYLE_COMPARE.items()]))
