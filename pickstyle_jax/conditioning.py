"""What the DiT is conditioned on, built in one place for training, sampling, evaluation and the demo.

- pixels: uint8 frames <-> float video in [-1, 1] (`pixels`, `to_uint8`).
- E(0): the latent of the all-zero clip (`zero_clip`, then the caller's VAE encode). The latents are normalised, so
  E(0) is a constant but not zero; PickStyle uses it as the *inactive* part of the VACE context.
- the VACE context: [E(0) | E(source) | ones(64)] on channels (16 + 16 + 64 = 96). PickStyle's mask is all ones:
  every frame is "reactive", and the inactive frames are the zero clip (`vace_context`). The null context of the
  text_context guidance mode replaces the source by E(0) as well (`null_vace_context`).
- the null prompt: Wan's default negative prompt, byte for byte, the CS-CFG null text (`null_prompt`).
- the caption table: every distinct caption of a data set encoded once into umT5 rows, looked up per batch
  (`TextTable`, `encode_table`, `dataset_captions`), so no text encoder runs inside a train step.

Everything here is pure array code or host-side bookkeeping: no model, no checkpoint, no training or sampling code.
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from pickstyle_jax import text

__all__ = ["MASK_CHANNELS", "pixels", "host_pixels", "to_uint8", "zero_clip", "vace_context", "null_vace_context",
           "null_prompt", "TextTable", "encode_table", "dataset_captions"]

f32 = jnp.float32
MASK_CHANNELS = 64  # the VAE's 8 x 8 spatial mask patch, one channel per pixel of it


# ------------------------------------------------------------------------------------------------------ pixels
def pixels(u8):
    """uint8 frames (any shape) -> float32 in [-1, 1], as the official pipelines scale them (x / 127.5 - 1)."""
    return jnp.asarray(u8).astype(f32) / 127.5 - 1.0


def host_pixels(u8) -> np.ndarray:
    """`pixels` in NumPy on the host. Not always bit-equal to `pixels`: NumPy (like torch) rounds x / 127.5
    correctly, while XLA turns the division by a constant into a multiplication by its reciprocal, 1 ulp off for
    some values. Only the demo's pretraining data path uses it, to keep its recorded numbers."""
    return np.asarray(u8).astype(np.float32) / 127.5 - 1.0


def to_uint8(video) -> np.ndarray:
    """Video in [-1, 1] (jax or numpy) -> uint8 on the host: clip, then round((x + 1) * 127.5)."""
    return np.asarray(jnp.round((jnp.clip(jnp.asarray(video), -1, 1) + 1) * 127.5)).astype(np.uint8)


# --------------------------------------------------------------------------------------------- VACE context
def zero_clip(frames: int, height: int, width: int):
    """The all-zero clip [1, F, H, W, 3] whose latent E(0) is the inactive context (encode it with the run's VAE)."""
    return jnp.zeros((1, frames, height, width, 3), f32)


def vace_context(zero_latent, z_source):
    """[E(0) | E(source) | ones(64)] [B, f, h, w, 96] fp32; zero_latent [1, f, h, w, 16] broadcasts over B."""
    inactive = jnp.broadcast_to(jnp.asarray(zero_latent).astype(f32), z_source.shape)
    ones = jnp.ones(z_source.shape[:-1] + (MASK_CHANNELS,), f32)
    return jnp.concatenate([inactive, jnp.asarray(z_source).astype(f32), ones], axis=-1)


def null_vace_context(zero_latent, z_source):
    """The context with no source in it, [E(0) | E(0) | ones(64)]: the text_context mode's null branch."""
    return vace_context(zero_latent, jnp.broadcast_to(jnp.asarray(zero_latent).astype(f32), z_source.shape))


# ------------------------------------------------------------------------------------------------ null prompt
@functools.cache
def null_prompt() -> str:
    """Wan's default negative prompt (`sample_neg_prompt` of the official shared config): CS-CFG's null text."""
    raw = (importlib.resources.files("pickstyle_jax") / "wan_negative_prompt.txt").read_bytes()
    return raw.decode("utf-8").rstrip("\n")


# ---------------------------------------------------------------------------------------------- caption table
def dataset_captions(source) -> list[str]:
    """Every caption of a data source, without decoding images where the source keeps records."""
    if hasattr(source, "sources"):
        return [c for s in source.sources for c in dataset_captions(s)]
    if hasattr(source, "records"):
        return [r.caption for r in source.records()]
    return [str(source[i]["caption"]) for i in range(len(source))]


class TextTable:
    """Caption -> umT5 embedding rows, all encoded up front; `rows` (static) is the padded row count of the table."""

    def __init__(self, emb_NLD: np.ndarray, lens_N: np.ndarray, captions: Sequence[str], text_len: int):
        self.index = {c: i for i, c in enumerate(captions)}
        self.rows = text.bucket_length(int(np.max(lens_N, initial=1)), text_len)
        self.emb, self.lens = emb_NLD[:, :self.rows], lens_N

    def __call__(self, captions) -> tuple[np.ndarray, np.ndarray]:
        try:
            ids = [self.index[str(c)] for c in captions]
        except KeyError as e:
            raise RuntimeError(f"caption {e} was not encoded before training") from None
        return self.emb[ids], self.lens[ids]


def encode_table(captions: Sequence[str], cache: text.EmbeddingCache, encode: Callable, text_len: int,
                 batch: int = 32) -> TextTable:
    """Encodes every distinct caption once, through the embedding cache, in bounded encoder batches."""
    distinct = list(dict.fromkeys(str(c) for c in captions))
    embs, lens = [], []
    for i in range(0, len(distinct), batch):
        e, n = cache.get_or_compute(distinct[i:i + batch], encode)
        embs.append(e)
        lens.append(n)
    return TextTable(np.concatenate(embs), np.concatenate(lens), distinct, text_len)
