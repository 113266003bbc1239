"""The synthetic world: shaded shapes on colour gradients, paired with a deterministic stylisation; no files.

`Synthetic` is a paired-image source like those of `sources` (records {"source", "target": uint8 [h, w, 3],
"caption", "style", "id"}), deterministic per (seed, index): the pipeline's default source, the tiny configs'
training data and the CPU demo's. The scene primitives (`COLOURS`, `SHAPES`, `shape_mask`, `stylise`) are public
because the demo's held-out motion world (pickstyle_jax/demo/world.py) draws moving scenes with them and stylises
them with the same style function, so its ground truth is exactly what training shows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (240, 210, 40),
           "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (235, 235, 235), "pink": (240, 120, 180)}
SHAPES = ("circle", "square", "triangle", "ring", "bar")
SYNTHETIC_STYLES = ("toon", "sketch", "neon", "pastel")


def shape_mask(kind: str, yy, xx, cy, cx, r, angle):
    """bool mask of a shape of `kind` (SHAPES) with centre (cy, cx), size r and rotation angle, at points (yy, xx)."""
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if kind == "bar":
        return (np.abs(u) <= 1.3 * r) & (np.abs(v) <= 0.35 * r)
    # triangle: inside three half-planes of an equilateral triangle of circumradius r
    inside = np.ones_like(u, bool)
    for k in range(3):
        t = angle + k * 2 * np.pi / 3
        inside &= (np.cos(t) * dx + np.sin(t) * dy) <= 0.5 * r
    return inside


def stylize(style: str, image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Deterministic "style" of a scene: flat colours per region, outlines from the region map."""
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    flat = palette[labels]  # flat fill per region (background = its mean colour)
    img = image.astype(np.float32)
    if style == "toon":  # posterised flat colours with dark outlines
        out = np.round(flat / 64.0) * 64.0
        out[edge] = 20.0
    elif style == "sketch":  # pencil lines on paper, faint grey shading
        grey = img.mean(-1, keepdims=True)
        out = np.repeat(235.0 - 0.15 * (255.0 - grey), 3, -1)
        out[edge] = 40.0
    elif style == "neon":  # dark scene, glowing saturated outlines
        out = 0.15 * flat
        out[edge] = np.clip(palette[labels][edge] * 1.4 + 40.0, 0, 255)
    elif style == "pastel":  # soft, desaturated flat colours, white outlines
        out = 0.45 * flat + 0.55 * 235.0
        out[edge] = 250.0
    else:
        raise ValueError(f"unknown synthetic style {style!r}; expected one of {SYNTHETIC_STYLES}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def synthetic_pair(index: int, height: int, width: int, style: str, seed: int = 0) -> dict:
    """One deterministic scene (shaded shapes on a gradient, mild texture) and its stylised version."""
    rng = np.random.default_rng([seed, index])
    names = list(COLOURS)
    bg_a, bg_b = rng.choice(len(names), 2, replace=False)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    g = (np.cos(theta) * xx / width + np.sin(theta) * yy / height)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    ca, cb = np.array(COLOURS[names[bg_a]], np.float32), np.array(COLOURS[names[bg_b]], np.float32)
    image = (1 - g)[..., None] * (0.6 * ca) + g[..., None] * (0.6 * cb)
    labels = np.zeros((height, width), np.int32)
    palette = [0.6 * (ca + cb) / 2]
    parts = []
    n = int(rng.integers(1, 4))
    for k in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = names[int(rng.integers(len(names)))]
        r = rng.uniform(0.12, 0.25) * min(height, width)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        mask = shape_mask(shape, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        c = np.array(COLOURS[colour], np.float32)
        shade = 1.1 - 0.5 * np.clip(((yy - cy + 0.4 * r) ** 2 + (xx - cx + 0.4 * r) ** 2) ** 0.5 / (2 * r), 0, 1)
        image[mask] = (c * shade[..., None])[mask]
        labels[mask] = k + 1
        palette.append(c)
        parts.append(f"a {colour} {shape}")
    image += rng.normal(0, 4.0, image.shape).astype(np.float32)  # sensor-like texture the style removes
    source = np.clip(np.round(image), 0, 255).astype(np.uint8)
    target = stylize(style, source, labels, np.array(palette, np.float32))
    scene = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    scene = scene[0].upper() + scene[1:]
    caption = f"{style.capitalize()} style. {scene} on a {names[bg_a]} to {names[bg_b]} gradient."
    return {"source": source, "target": target, "caption": caption, "style": style, "id": f"synthetic/{index}"}


class Synthetic:
    """`num_examples` procedurally drawn pairs of `height` x `width`; example i has style styles[i % len(styles)].
    Deterministic per (seed, index), made on the fly, nothing stored on disk. Small worlds (up to `cache_bytes`)
    are memoised per process, so a long demo run pays for drawing once, like reading a small PNG."""

    def __init__(self, num_examples: int = 64, height: int = 64, width: int = 96,
                 styles: Sequence[str] = SYNTHETIC_STYLES, seed: int = 0, cache_bytes: int = 64 << 20):
        for s in styles:
            if s not in SYNTHETIC_STYLES:
                raise ValueError(f"unknown synthetic style {s!r}; expected one of {SYNTHETIC_STYLES}")
        self.num_examples, self.height, self.width = int(num_examples), int(height), int(width)
        self.styles, self.seed = tuple(styles), int(seed)
        self._cache = {} if self.num_examples * self.height * self.width * 6 <= cache_bytes else None
        self.skipped: list = []

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        ex = self._cache.get(index) if self._cache is not None else None
        if ex is None:
            ex = synthetic_pair(index, self.height, self.width, self.styles[index % len(self.styles)], self.seed)
            for k in ("source", "target"):
                ex[k].flags.writeable = False  # shared by every later read of this index
            if self._cache is not None:
                self._cache[index] = ex
        return dict(ex)

    def __getstate__(self):
        return {**self.__dict__, "_cache": {} if self._cache is not None else None}

    def __repr__(self) -> str:
        return f"Synthetic(n={self.num_examples}, {self.height}x{self.width}, styles={self.styles})"
