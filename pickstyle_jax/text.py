"""The text path shared by training and sampling, and an on-disk cache of prompt embeddings.

`encode_text` is the official Wan text path (docs/REFERENCE.md §1, §5) as one function: clean + tokenize (`</s>`, pad
to `text_len`), run the umT5 encoder, trim every row to its true length L (non-pad tokens, `</s>` included) and
zero-pad back to `text_len` rows. The DiT zero-pads again, but a fixed [B, text_len, D] keeps shapes static under jit.

Speed: the encoder runs on the shortest power-of-two length (>= 16, <= text_len) holding the longest prompt of the
batch, not on all `text_len` slots. This is exact, not an approximation: positions beyond the mask are zeroed, padded
keys get probability exactly 0, and the relative position bias depends only on key - query, so valid rows do not
depend on how much padding follows them (differences are float reordering only, ~1e-7). Each (batch size, bucket)
compiles once; the jitted helper takes params as an argument, so new weights do not recompile.

Fewer rows for the DiT: with `trim=True`, `encode_text` and `EmbeddingCache.get_or_compute` return
[B, bucket_length(max lens), D] instead of [B, text_len, D] (still zero beyond each row's length). The DiT folds the
padding exactly given `text_lens`, so the result is the same, and each bucket is one static shape to compile.

`EmbeddingCache` stores one `.npz` per distinct caption, keyed by sha256 of (encoder identity, tokenizer identity,
text_len, caption). Only the L true rows are stored. Storage is lossless: bfloat16 when every value is exactly a
bfloat16 number (always the case for a bfloat16 encoder, whose last op rounds to bf16), float32 otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pickstyle_jax import files
from pickstyle_jax.models import umt5

__all__ = ["encode_text", "EmbeddingCache", "checkpoint_identity", "bucket_length"]

_MIN_BUCKET = 16


def bucket_length(n: int, text_len: int) -> int:
    """Smallest power of two >= max(n, 16), capped at text_len."""
    b = _MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, text_len)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode_padded(cfg: umt5.Umt5Config, params, ids, mask, text_len: int):
    emb = umt5.encode(cfg, params, ids, mask)
    return jnp.pad(emb, ((0, 0), (0, text_len - emb.shape[1]), (0, 0)))


def encode_text(cfg: umt5.Umt5Config, params, tokenizer, prompts: Sequence[str] | str, *, text_len: int = 512,
                trim: bool = False):
    """prompts -> (emb float32 [B, text_len, d_model], rows >= lens[b] zero; lens int32 [B], `</s>` counted).

    `tokenizer` is a `umt5.Tokenizer` (anything with `tok(texts, max_len) -> (ids, mask)`). Long prompts are truncated
    to `text_len` tokens with a warning (from the tokenizer). trim: return only the first
    `bucket_length(lens.max(), text_len)` rows, [B, bucket, d_model] (the rows dropped are all zero).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids, mask = tokenizer(list(prompts), max_len=text_len)
    lens = np.asarray(mask).sum(axis=1).astype(np.int32)
    n = bucket_length(int(lens.max(initial=1)), text_len)
    emb = _encode_padded(cfg, params, np.asarray(ids)[:, :n], np.asarray(mask)[:, :n], n if trim else text_len)
    return emb, lens


# ------------------------------------------------------------------------------------------------- identities
def checkpoint_identity(path, cfg: umt5.Umt5Config | None = None) -> str:
    """A sha256 naming the weights of a converted umT5 checkpoint (and, if given, the config it runs with).

    Uses `params_sha256` from config.json when the converter wrote it (a content hash of the params). Otherwise it
    hashes the params folder's file list with sizes, small files whole and the first/last MiB of large ones.
    `cfg`: the runtime config (e.g. after loading with a dtype override), since compute dtype changes the output.
    """
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    meta.pop("source", None)  # where it was converted from does not change the weights
    h = hashlib.sha256(b"umt5-checkpoint-v1\0")
    h.update(json.dumps(meta, sort_keys=True).encode())
    if "params_sha256" not in meta:
        root = path / "params"
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(root)}|{size}\0".encode())
            with open(f, "rb") as fh:
                if size <= 2 << 20:
                    h.update(fh.read())
                else:
                    h.update(fh.read(1 << 20))
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    if cfg is not None:
        h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ cache
class EmbeddingCache:
    """Prompt embeddings computed once per distinct caption and kept on disk under `directory`.

    encoder_id: `checkpoint_identity(umt5_dir, cfg)` (or any string naming encoder weights + compute dtype).
    tokenizer_id: `tokenizer.identity` (a hash of the sentencepiece file). text_len: the padded length.
    Files: `directory/ab/abcdef....npz` holding `emb` [L, D] (float32, or bfloat16 bits as uint16), `dtype`, `caption`.
    Writes go to a unique temporary file in the same folder and are renamed into place, so concurrent writers and
    interrupted runs never leave a partial file under a final name.
    """

    def __init__(self, directory, encoder_id: str, *, tokenizer_id: str = "", text_len: int = 512):
        self.directory = Path(directory)
        self.encoder_id, self.tokenizer_id, self.text_len = str(encoder_id), str(tokenizer_id), int(text_len)

    @classmethod
    def for_checkpoint(cls, directory, umt5_dir, tokenizer, *, cfg=None, text_len: int = 512) -> "EmbeddingCache":
        return cls(directory, checkpoint_identity(umt5_dir, cfg), tokenizer_id=tokenizer.identity, text_len=text_len)

    def key(self, caption: str) -> str:
        h = hashlib.sha256(b"pickstyle-text-cache-v1\0")
        for part in (self.encoder_id, self.tokenizer_id, str(self.text_len), caption):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: no ambiguity between fields
        return h.hexdigest()

    def path(self, caption: str) -> Path:
        k = self.key(caption)
        return self.directory / k[:2] / f"{k}.npz"

    def get(self, caption: str) -> np.ndarray | None:
        """The stored [L, D] float32 rows, or None."""
        p = self.path(caption)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            if str(z["caption"]) != caption:
                raise RuntimeError(f"{p}: cache entry holds another caption (sha256 collision?)")
            emb = z["emb"]
            if str(z["dtype"]) == "bfloat16":
                emb = emb.view(ml_dtypes.bfloat16)
            return emb.astype(np.float32)

    def put(self, caption: str, emb_LD: np.ndarray) -> Path:
        emb_LD = np.asarray(emb_LD, np.float32)
        as_bf16 = emb_LD.astype(ml_dtypes.bfloat16)
        lossless_bf16 = np.array_equal(as_bf16.astype(np.float32), emb_LD)
        data = as_bf16.view(np.uint16) if lossless_bf16 else emb_LD
        p = self.path(caption)

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, emb=data, dtype=np.array("bfloat16" if lossless_bf16 else "float32"),
                         caption=np.array(caption))

        return files.atomic_write(p, write)

    def get_or_compute(self, captions: Sequence[str], compute_fn: Callable, *, trim: bool = False):
        """(emb float32 [N, text_len, D], lens int32 [N]) for `captions`, computing only the missing ones.

        compute_fn(list of distinct missing captions) -> (emb [n, >= max len, D], lens [n]), e.g.
        `functools.partial(encode_text, cfg, params, tokenizer, text_len=text_len)` (with or without trim).
        trim: emb is [N, bucket_length(lens.max(), text_len), D] instead, the same rows without the all-zero tail.
        """
        captions = list(captions)
        found = {c: self.get(c) for c in dict.fromkeys(captions)}
        missing = [c for c, e in found.items() if e is None]
        if missing:
            emb, lens = compute_fn(missing)
            emb, lens = np.asarray(jax.device_get(emb), np.float32), np.asarray(lens)
            for c, e, n in zip(missing, emb, lens):
                found[c] = e[:int(n)]
                self.put(c, found[c])
        dims = {e.shape[-1] for e in found.values()}
        if len(dims) != 1:
            raise RuntimeError(f"cache entries under {self.directory} have different widths {sorted(dims)}")
        lens = np.asarray([len(found[c]) for c in captions], np.int32)
        rows = bucket_length(int(lens.max(initial=1)), self.text_len) if trim else self.text_len
        if lens.max(initial=0) > rows:
            raise RuntimeError(f"cache entries under {self.directory} hold {lens.max()} rows, more than "
                               f"text_len={self.text_len}")
        out = np.zeros((len(captions), rows, dims.pop()), np.float32)
        for b, c in enumerate(captions):
            out[b, :lens[b]] = found[c]
        return out, lens
