"""The caption table of a training run: every distinct caption of the data set encoded once, before step 1, into
umT5 embedding rows (through text.py's embedding cache), after which umT5 leaves device memory. The loop looks the
captions of each batch up in it (`train.device_batch`), so no text encoder runs in the train step.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from pickstyle_jax.models import umt5


def dataset_captions(source) -> list[str]:
    """Every caption of a data source, without decoding images where the source keeps records."""
    if hasattr(source, "sources"):
        return [c for s in source.sources for c in dataset_captions(s)]
    if hasattr(source, "records"):
        return [r.caption for r in source.records()]
    return [str(source[i]["caption"]) for i in range(len(source))]


class TextTable:
    """Caption -> embedding rows, all encoded before training; `rows` (static) is the padded row count."""

    def __init__(self, emb_NLD: np.ndarray, lens_N: np.ndarray, captions: list[str], text_len: int):
        from pickstyle_jax import text

        self.index = {c: i for i, c in enumerate(captions)}
        self.rows = text.bucket_length(int(lens_N.max(initial=1)), text_len)
        self.emb, self.lens = emb_NLD[:, :self.rows], lens_N

    def __call__(self, captions) -> tuple[np.ndarray, np.ndarray]:
        try:
            ids = [self.index[str(c)] for c in captions]
        except KeyError as e:
            raise RuntimeError(f"caption {e} was not encoded before training") from None
        return self.emb[ids], self.lens[ids]


def build_text_table(config, workdir, tokenizer, captions) -> TextTable:
    """Encodes every distinct caption once (through the embedding cache), then drops umT5 from device memory."""
    from pickstyle_jax import checkpoints, text

    m, text_len = config.model, int(config.text.text_len)
    distinct = list(dict.fromkeys(captions))
    if m.umt5:
        tcfg, tparams = checkpoints.load_umt5(m.umt5)
        encoder_id = text.checkpoint_identity(m.umt5, tcfg)
    else:
        tcfg = umt5.Umt5Config.named(m.umt5_variant)
        tparams = umt5.init(tcfg, jax.random.fold_in(jax.random.key(config.seed), 4))
        encoder_id = f"random:{m.umt5_variant}:seed{config.seed}"
    cache = text.EmbeddingCache(config.text.cache_dir or Path(workdir) / "text_cache", encoder_id,
                                tokenizer_id=getattr(tokenizer, "identity", repr(tokenizer)), text_len=text_len)
    encode = functools.partial(text.encode_text, tcfg, tparams, tokenizer, text_len=text_len)
    embs, lens = [], []
    for i in range(0, len(distinct), 32):  # bounded encoder batches
        e, n = cache.get_or_compute(distinct[i:i + 32], encode)
        embs.append(e)
        lens.append(n)
    del tparams, encode
    return TextTable(np.concatenate(embs), np.concatenate(lens), distinct, text_len)
