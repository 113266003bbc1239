"""Held-out evaluation clips with exact ground truth: the synthetic style world, set in motion.

The training data's synthetic world (data/synthetic.py) draws still scenes (shaded shapes on a colour gradient) and
stylises them with a deterministic style function; training clips get their motion from camera augmentation only.
Here every object moves on its own, translating and rotating about its centre, and a camera pans, zooms and turns
slightly on top. Each frame is rendered exactly from the scene description, so

- `source`: the clip as a camera would see it (same look as training: palette, shading, mild surface texture);
- `target`: the ground truth, the training style function applied to each source frame with its region map;
- `flow`, `valid`: the exact backward motion, for `metrics.temporal_error`.

Geometry. Points are (y, x) in pixels, pixel centres at integers. `objects[t, k]` (2 x 3, homogeneous) maps object
k's local frame (centred on the shape, unrotated) to world coordinates at frame t; `camera[t]` maps world to screen
(the identity at t = 0). A screen pixel p of frame t+1 that shows object k (k = 0: background, local = world) came
from q = camera[t] objects[t, k] objects[t+1, k]^-1 camera[t+1]^-1 p in frame t; `flow[t]` holds q. `valid[t]` keeps
pixels whose motion is unambiguous: q lies inside frame t, all four bilinear neighbours of q show the same region
and lie off region boundaries, and p itself lies off a boundary (the style draws outlines on boundary pixels, which
rasterise slightly differently from frame to frame, and occluded or disoccluded pixels have no source).

Surface texture (the sensor-like noise the style removes) is fixed to each surface: it moves with its object, so
frame differences come from motion alone, as in real footage. Clips are deterministic in (seed, index) and drawn
from a random stream distinct from the training world's, so they are held out whatever the training seed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pickstyle_jax.data.synthetic import COLOURS, SHAPES, SYNTHETIC_STYLES, shape_mask, stylize

__all__ = ["Clip", "render_clip", "World", "compose", "invert"]

_STREAM = 0x5EED_E7A1  # separates this world's random stream from synthetic_pair's rng([seed, index])
_TEXTURE = 128         # side of the (wrapping) texture tile
_NOISE_STD = 4.0       # as the training world's texture


@dataclasses.dataclass(frozen=True)
class Clip:
    """One held-out clip. F frames of H x W; K moving objects."""

    source: np.ndarray   # uint8 [F, H, W, 3]
    target: np.ndarray   # uint8 [F, H, W, 3]: the ground-truth stylisation
    labels: np.ndarray   # int32 [F, H, W]: 0 background, k = object k (drawn in order, later on top)
    flow: np.ndarray     # float32 [F-1, H, W, 2]: (y, x) in frame t of each pixel of frame t+1
    valid: np.ndarray    # bool [F-1, H, W]
    camera: np.ndarray   # float64 [F, 2, 3]: world -> screen
    objects: np.ndarray  # float64 [F, K, 2, 3]: object local -> world
    caption: str
    style: str
    id: str


def _affine(angle: float, scale: float, ty: float, tx: float) -> np.ndarray:
    """2 x 3 map (y, x) -> scale * R(angle) (y, x) + (ty, tx); positive angles turn +x towards +y."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, s, ty], [-s, c, tx]], np.float64)


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a after b, for 2 x 3 affine maps."""
    return np.concatenate([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2:] + a[:, 2:])], axis=1)


def invert(a: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(a[:, :2])
    return np.concatenate([m, -m @ a[:, 2:]], axis=1)


def _apply(a: np.ndarray, yy: np.ndarray, xx: np.ndarray):
    return a[0, 0] * yy + a[0, 1] * xx + a[0, 2], a[1, 0] * yy + a[1, 1] * xx + a[1, 2]


def _sample_tile(tile: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Bilinear lookup in a wrapping square tile at real coordinates."""
    n = tile.shape[0]
    y0, x0 = np.floor(yy), np.floor(xx)
    fy, fx = (yy - y0)[..., None].astype(np.float32), (xx - x0)[..., None].astype(np.float32)
    y0, x0 = y0.astype(np.int64) % n, x0.astype(np.int64) % n
    y1, x1 = (y0 + 1) % n, (x0 + 1) % n
    return ((tile[y0, x0] * (1 - fx) + tile[y0, x1] * fx) * (1 - fy) +
            (tile[y1, x0] * (1 - fx) + tile[y1, x1] * fx) * fy)


@dataclasses.dataclass(frozen=True)
class _Scene:
    colours: tuple            # background colour names (a, b)
    theta: float              # gradient direction
    g_range: tuple            # gradient normalisation (min, max) over the first frame
    shapes: tuple             # per object (kind, colour name, radius)
    textures: np.ndarray      # [K + 1, T, T, 3]: background and per-object texture tiles
    camera: np.ndarray        # [F, 2, 3]
    objects: np.ndarray       # [F, K, 2, 3]


def _draw_scene(rng: np.random.Generator, frames: int, height: int, width: int) -> _Scene:
    names = list(COLOURS)
    bg_a, bg_b = (names[i] for i in rng.choice(len(names), 2, replace=False))
    theta = float(rng.uniform(0, 2 * np.pi))
    corners = np.array([[0, 0], [0, width - 1], [height - 1, 0], [height - 1, width - 1]], np.float64)
    g = np.cos(theta) * corners[:, 1] / width + np.sin(theta) * corners[:, 0] / height
    n = int(rng.integers(1, 4))
    side = min(height, width)
    p = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    shapes, tracks = [], []
    for _ in range(n):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = names[int(rng.integers(len(names)))]
        r = float(rng.uniform(0.12, 0.22) * side)
        start = rng.uniform([r, r], [height - r, width - r])
        end = rng.uniform([r, r], [height - r, width - r])
        d = end - start  # a random heading, its length kept between 10% and 35% of the short side
        length = float(np.linalg.norm(d))
        d = d / max(length, 1e-6) * float(np.clip(length, 0.10 * side, 0.35 * side))
        a0 = float(rng.uniform(0, 2 * np.pi))
        turn = float(rng.uniform(np.deg2rad(20), np.deg2rad(90)) * rng.choice([-1.0, 1.0]))
        shapes.append((kind, colour, r))
        tracks.append([_affine(a0 + turn * pt, 1.0, *(start + d * pt)) for pt in p])
    pan = rng.uniform(-0.06, 0.06, 2) * np.array([height, width])
    zoom = float(np.exp(rng.uniform(np.log(0.95), np.log(1.08))))
    spin = float(np.deg2rad(rng.uniform(-3.0, 3.0)))
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    camera = []
    for pt in p:
        # zoom and turn about the screen centre, then pan: screen = centre + S R (world - centre) + pan * pt
        m = _affine(spin * pt, zoom ** pt, 0.0, 0.0)
        m[:, 2] = centre - m[:, :2] @ centre + pan * pt
        camera.append(m)
    textures = rng.normal(0.0, _NOISE_STD, (n + 1, _TEXTURE, _TEXTURE, 3)).astype(np.float32)
    return _Scene((bg_a, bg_b), theta, (float(g.min()), float(g.max())), tuple(shapes), textures,
                  np.stack(camera), np.stack(tracks, axis=1) if n else np.zeros((frames, 0, 2, 3)))


def _render_frame(scene: _Scene, t: int, height: int, width: int):
    """(image float32 [H, W, 3] before texture rounding, labels int32 [H, W], palette float32 [K+1, 3])."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    wy, wx = _apply(invert(scene.camera[t]), yy, xx)
    ca, cb = (np.array(COLOURS[c], np.float32) for c in scene.colours)
    lo, hi = scene.g_range
    g = (np.cos(scene.theta) * wx / width + np.sin(scene.theta) * wy / height - lo) / max(hi - lo, 1e-6)
    g = np.clip(g, 0.0, 1.0).astype(np.float32)[..., None]
    image = (1 - g) * (0.6 * ca) + g * (0.6 * cb) + _sample_tile(scene.textures[0], wy, wx)
    labels = np.zeros((height, width), np.int32)
    palette = [0.6 * (ca + cb) / 2]
    for k, (kind, colour, r) in enumerate(scene.shapes):
        uy, ux = _apply(invert(scene.objects[t, k]), wy, wx)
        mask = shape_mask(kind, uy, ux, 0.0, 0.0, r, 0.0)
        c = np.array(COLOURS[colour], np.float32)
        # shading and texture live in the object's frame, so they move with it (as in synthetic.synthetic_pair,
        # whose highlight sits up-left of the centre)
        shade = (1.1 - 0.5 * np.clip(np.hypot(uy + 0.4 * r, ux + 0.4 * r) / (2 * r), 0, 1)).astype(np.float32)
        body = c * shade[..., None] + _sample_tile(scene.textures[k + 1], uy, ux)
        image[mask] = body[mask]
        labels[mask] = k + 1
        palette.append(c)
    return image, labels, np.array(palette, np.float32)


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels the style outlines: a 4-neighbour has another label (the same rule as synthetic.stylize)."""
    e = np.zeros(labels.shape, bool)
    dy, dx = labels[1:] != labels[:-1], labels[:, 1:] != labels[:, :-1]
    e[1:] |= dy
    e[:-1] |= dy
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    return e


def _flow(scene: _Scene, labels: np.ndarray):
    f, h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    k_all = scene.objects.shape[1]
    flows, valids = [], []
    interior = ~np.stack([_boundary(l) for l in labels])
    for t in range(f - 1):
        lab = labels[t + 1]
        qy, qx = np.zeros((h, w)), np.zeros((h, w))
        for k in range(k_all + 1):
            back = compose(scene.camera[t], invert(scene.camera[t + 1]))
            if k:
                back = compose(scene.camera[t], compose(scene.objects[t, k - 1],
                               compose(invert(scene.objects[t + 1, k - 1]), invert(scene.camera[t + 1]))))
            m = lab == k
            ky, kx = _apply(back, yy[m], xx[m])
            qy[m], qx[m] = ky, kx
        ok = interior[t + 1] & (qy >= 0) & (qy <= h - 1) & (qx >= 0) & (qx <= w - 1)
        y0 = np.clip(np.floor(qy).astype(np.int64), 0, h - 1)
        x0 = np.clip(np.floor(qx).astype(np.int64), 0, w - 1)
        for y, x in ((y0, x0), (np.minimum(y0 + 1, h - 1), x0), (y0, np.minimum(x0 + 1, w - 1)),
                     (np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1))):
            ok &= (labels[t][y, x] == lab) & interior[t][y, x]
        flows.append(np.stack([qy, qx], -1).astype(np.float32))
        valids.append(ok)
    if not flows:
        return np.zeros((0, h, w, 2), np.float32), np.zeros((0, h, w), bool)
    return np.stack(flows), np.stack(valids)


def render_clip(index: int, frames: int, height: int, width: int, style: str, seed: int = 0) -> Clip:
    """Clip `index` of the held-out world: deterministic in (seed, index, frames, height, width, style)."""
    if style not in SYNTHETIC_STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; expected one of {SYNTHETIC_STYLES}")
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need frames >= 1 and frames of at least 8 x 8 pixels, got {frames} x {height} x {width}")
    rng = np.random.default_rng([_STREAM, seed, index])
    scene = _draw_scene(rng, frames, height, width)
    sources, targets, labels = [], [], []
    for t in range(frames):
        image, lab, palette = _render_frame(scene, t, height, width)
        src = np.clip(np.round(image), 0, 255).astype(np.uint8)
        sources.append(src)
        targets.append(stylize(style, src, lab, palette))
        labels.append(lab)
    labels = np.stack(labels)
    flow, valid = _flow(scene, labels)
    parts = [f"a {colour} {kind}" for kind, colour, _ in scene.shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = text[0].upper() + text[1:]
    caption = f"{style.capitalize()} style. {text} on a {scene.colours[0]} to {scene.colours[1]} gradient."
    return Clip(np.stack(sources), np.stack(targets), labels, flow, valid, scene.camera, scene.objects, caption,
                style, f"world/{seed}/{index}")


class World:
    """`num_clips` held-out clips; clip i has style styles[i % len(styles)] (as data.synthetic.Synthetic)."""

    def __init__(self, num_clips: int, frames: int, height: int, width: int,
                 styles=SYNTHETIC_STYLES, seed: int = 0):
        styles = (styles,) if isinstance(styles, str) else tuple(styles)
        for s in styles:
            if s not in SYNTHETIC_STYLES:
                raise ValueError(f"unknown synthetic style {s!r}; expected one of {SYNTHETIC_STYLES}")
        if not styles:
            raise ValueError("World needs at least one style")
        self.num_clips, self.frames, self.height, self.width = int(num_clips), int(frames), int(height), int(width)
        self.styles, self.seed = styles, int(seed)

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> Clip:
        if not 0 <= index < self.num_clips:
            raise IndexError(index)
        return render_clip(index, self.frames, self.height, self.width, self.styles[index % len(self.styles)],
                           self.seed)

    def reference_frames(self, style: str, clips: int = 4, stride: int = 1) -> np.ndarray:
        """Ground-truth frames [N, H, W, 3] of `clips` scenes outside this world's clips, all in `style`: a style
        reference set for `metrics.style_distance` that shares no scene with the evaluated clips."""
        out = [render_clip(self.num_clips + 1000 + i, self.frames, self.height, self.width, style,
                           self.seed).target[::stride] for i in range(clips)]
        return np.concatenate(out)
