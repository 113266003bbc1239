"""Embedding metrics behind a pluggable feature extractor (CLIP, CSD, DreamSim, ... or the tiny random one).

A feature extractor is anything with

    __call__(frames uint8 [N, H, W, 3]) -> float [N, D]        (one embedding per frame)
    encode_text(prompts: list[str]) -> float [P, D]            (optional; only `text_video_score` needs it)

Embeddings need not be normalised; the metrics normalise them. Metrics:

- `frame_consistency(extractor, video)`: mean cosine similarity of consecutive frame embeddings, in [-1, 1]
  (1 = every frame embeds the same; CLIP-based "temporal consistency" in video-editing papers).
- `text_video_score(extractor, video, prompt)`: mean over frames of the cosine between the frame and the prompt
  embedding ("CLIP score" without the x100 scaling).
- `embedding_similarity(extractor, a, b)`: mean per-frame cosine between two clips (with DreamSim embeddings:
  1 - this is the usual content distance to the source; with CSD embeddings against style images: style score).

Plugging in a real model: wrap it in a small class in your own code (pickstyle_jax itself never imports torch),
converting uint8 frames to whatever the model wants and returning numpy, e.g. with Hugging Face CLIP:

    class Clip:
        def __init__(self, name="openai/clip-vit-base-patch32"):
            import transformers
            self.model = transformers.CLIPModel.from_pretrained(name).eval()
            self.proc = transformers.CLIPProcessor.from_pretrained(name)
        def __call__(self, frames):
            px = self.proc(images=list(frames), return_tensors="pt")["pixel_values"]
            return self.model.get_image_features(pixel_values=px).detach().numpy()
        def encode_text(self, prompts):
            t = self.proc(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
            return self.model.get_text_features(**t).detach().numpy()

CSD (style) and DreamSim (content) wrap the same way: their image embedding is `__call__`; they have no text side.

`RandomConvFeatures` is a deterministic stand-in for tests and offline runs: two seeded random 3x3 conv layers
(stride 2, ReLU) and global average + max pooling; its text side hashes byte trigrams into seeded random vectors.
It is sensitive to colour and local structure, so its numbers move the right way, but it is not a trained model.
"""
from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["FeatureExtractor", "RandomConvFeatures", "frame_consistency", "text_video_score",
           "embedding_similarity", "embed"]


@runtime_checkable
class FeatureExtractor(Protocol):
    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


def _frames_uint8(video, name="video") -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"{name} must be [frames, height, width, 3], got shape {v.shape}")
    if v.dtype == np.uint8:
        return v
    if not np.issubdtype(v.dtype, np.floating) or v.min(initial=0) < -1.001 or v.max(initial=0) > 1.001:
        raise ValueError(f"{name} must be uint8 [0, 255] or float [-1, 1], got {v.dtype} "
                         f"in [{v.min(initial=0)}, {v.max(initial=0)}]")
    return np.clip(np.round((v + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _normalise(e, n_expected: int, what: str) -> np.ndarray:
    e = np.asarray(e, np.float64)
    if e.ndim != 2 or e.shape[0] != n_expected:
        raise ValueError(f"the feature extractor returned {what} of shape {e.shape}; expected [{n_expected}, D]")
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def embed(extractor: FeatureExtractor, video) -> np.ndarray:
    """Unit-norm frame embeddings [F, D] of a clip."""
    v = _frames_uint8(video)
    return _normalise(extractor(v), v.shape[0], "frame embeddings")


def frame_consistency(extractor: FeatureExtractor, video) -> float:
    """Mean cosine of consecutive frame embeddings (1.0 for a one-frame clip)."""
    e = embed(extractor, video)
    if e.shape[0] < 2:
        return 1.0
    return float(np.mean(np.sum(e[1:] * e[:-1], axis=-1)))


def text_video_score(extractor: FeatureExtractor, video, prompt: str) -> float:
    """Mean over frames of cos(frame embedding, prompt embedding); needs `extractor.encode_text`."""
    if not hasattr(extractor, "encode_text"):
        raise TypeError(f"{type(extractor).__name__} has no encode_text, so it cannot score text against video")
    e = embed(extractor, video)
    t = _normalise(extractor.encode_text([prompt]), 1, "text embeddings")
    if t.shape[1] != e.shape[1]:
        raise ValueError(f"text embeddings have {t.shape[1]} dims but frame embeddings {e.shape[1]}")
    return float(np.mean(e @ t[0]))


def embedding_similarity(extractor: FeatureExtractor, a, b) -> float:
    """Mean per-frame cosine between two clips of equal frame count."""
    ea, eb = embed(extractor, a), embed(extractor, b)
    if ea.shape != eb.shape:
        raise ValueError(f"clips embed to {ea.shape} and {eb.shape}; they need the same frame count")
    return float(np.mean(np.sum(ea * eb, axis=-1)))


class RandomConvFeatures:
    """Seeded random conv features: 3 -> width -> dim channels (3x3, stride 2, ReLU), then [mean | max] pooling,
    so embeddings are [N, 2 * dim]. Deterministic in `seed`; numpy only."""

    def __init__(self, seed: int = 0, width: int = 16, dim: int = 32):
        rng = np.random.default_rng(seed)
        self.w1 = (rng.standard_normal((3, 3, 3, width)) / np.sqrt(27)).astype(np.float32)
        self.b1 = (0.1 * rng.standard_normal(width)).astype(np.float32)
        self.w2 = (rng.standard_normal((3, 3, width, dim)) / np.sqrt(9 * width)).astype(np.float32)
        self.b2 = (0.1 * rng.standard_normal(dim)).astype(np.float32)
        self.seed, self.dim = seed, 2 * dim

    @staticmethod
    def _conv(x, w, b):
        """'same'-padded 3x3 conv, stride 2, as 9 shifted matmuls: [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), O]."""
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w_ = x.shape[1], x.shape[2]
        out = b
        for dy in range(3):
            for dx in range(3):
                out = out + xp[:, dy:dy + h:2, dx:dx + w_:2] @ w[dy, dx]
        return np.maximum(out, 0.0)

    def __call__(self, frames) -> np.ndarray:
        x = _frames_uint8(frames, "frames").astype(np.float32) / 127.5 - 1.0
        h = self._conv(self._conv(x, self.w1, self.b1), self.w2, self.b2)
        return np.concatenate([h.mean(axis=(1, 2)), h.max(axis=(1, 2))], axis=-1)

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), np.float32)
        for i, p in enumerate(prompts):
            b = p.lower().encode("utf-8")
            for j in range(max(len(b) - 2, 1)):
                digest = hashlib.sha256(b"%d:" % self.seed + b[j:j + 3]).digest()
                out[i] += np.random.default_rng(list(digest[:8])).standard_normal(self.dim).astype(np.float32)
        return out
